"""The report of `gptkit compare`: results.json, report.md, index.html and the plots."""

from __future__ import annotations

from pathlib import Path

from gptkit.fileio import atomic_write_json
from gptkit.evaluation.report import Report, pyplot

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def write_report(s: dict, out: Path) -> None:
    models = s["models"]
    plt = pyplot()
    rep = Report("gptkit compare: " + " vs ".join(m["label"] for m in models))
    rep.text(f"Measured on {s['device']}. Models: " + "; ".join(f"{m['label']} = {m['path']}"
                                                            + (f" ({m['quantize']})" if m["quantize"] else "")
                                                            for m in models), note=True)
    _size_speed(rep, models, plt)
    if any(m["text"] for m in models):
        _text(rep, models, s["text_source"], plt)
    if s["task"]:
        _task(rep, models, s, plt)
        _disagreements(rep, models, s)
    if any(m["answers"] for m in models):
        _answers(rep, models)
    atomic_write_json(Path(out) / "results.json", s)
    rep.write(out)


def _size_speed(rep: Report, models: list[dict], plt) -> None:
    rep.heading("Size and speed")
    rows = [[m["label"], f"{m['size']['params']:,}", f"{m['size']['forward_flops_per_token']:.3g}",
             f"{m['size']['weights_bytes'] / 2**20:.2f}", f"{m['size']['kv_bytes_per_token'] / 1024:.1f}",
             m["size"]["context"], f"{m['speed']['prefill_tokens_per_s']:,.0f}",
             f"{m['speed']['decode_tokens_per_s']:,.0f}"] for m in models]
    rep.table(["model", "parameters", "FLOPs/token (forward)", "weights MiB", "KV cache KiB/token", "context",
               "prefill tokens/s", "decode tokens/s"], rows)
    rep.text("FLOPs/token: 2N + 4·n_layer·n_embd·context. Weights: the bytes of every tensor as loaded "
             "(int8 weights count 1 byte). Speed: the engine at batch 1 on this machine in this run, best of "
             f"{models[0]['speed'].get('rounds', 'all')} rounds with the models alternating; prefill of "
             f"{models[0]['speed']['prefill_tokens']} tokens, decode of {models[0]['speed']['decode_tokens']}. "
             + _speed_noise(models), note=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"),
                              ("prefill tokens/s", "decode tokens/s")):
        _bars(ax, [m["label"] for m in models], [m["speed"][key] for m in models], title)
    rep.figure("speed", fig)


def _speed_noise(models: list[dict]) -> str:
    """How much one model's speed moved between rounds here: differences below that are noise."""
    spreads = [max(v) / min(v) - 1 for m in models for k, v in m["speed"].items()
               if k.endswith("_by_round") and len(v) > 1 and min(v) > 0]
    if not spreads:
        return "One round only: no measure of this machine's noise, so read small speed differences with care."
    return (f"Noise: one model's speed moved by up to {100 * max(spreads):.0f}% between rounds on this machine; "
            "differences smaller than that say nothing.")


def _text(rep: Report, models: list[dict], source: str, plt) -> None:
    rep.heading("Text: bits per byte")
    rep.text(f"On {source}. Bits per byte compare across tokenizers; loss and perplexity are per token "
             "(comparable only between models that share a tokenizer).", note=True)
    best = min(m["text"]["bpb"] for m in models)
    rows = [[m["label"] + (" (best)" if m["text"]["bpb"] == best else ""), f"{m['text']['bpb']:.4f}",
             f"{m['text']['loss']:.4f}", f"{m['text']['perplexity']:.2f}", f"{m['text']['tokens']:,}",
             f"{m['text']['bytes']:,}"] for m in models]
    rep.table(["model", "bits/byte", "loss (nats/token)", "perplexity", "tokens", "bytes"], rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    _bars(axes[0], [m["label"] for m in models], [m["text"]["bpb"] for m in models], "bits per byte (lower is better)")
    ax = axes[1]
    for i, m in enumerate(models):
        ax.scatter(m["size"]["params"], m["text"]["bpb"], color=COLORS[i % len(COLORS)], label=m["label"], s=40)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M")  # 1M, 10M: not 10^6 over each other
    ax.xaxis.set_minor_formatter(lambda x, _: "")
    ax.set_xlabel("parameters")
    ax.set_ylabel("bits per byte")
    ax.set_title("bits per byte vs parameters")
    ax.legend(fontsize=8)
    rep.figure("bpb", fig)


def _task(rep: Report, models: list[dict], s: dict, plt) -> None:
    rep.heading(f"Task: {s['task']}")
    rep.text(f"{s['n_examples']} examples from {s['tasks_file']}. [lo, hi]: 95% bootstrap interval over examples "
             f"({s['bootstrap']} resamples). Differences are paired (the same resampled examples for both models); "
             "* marks an interval that excludes 0, a gap unlikely to be noise from the choice of examples."
             + (f" BLEU is computed with sacrebleu's `{s['bleu_tokenize']}` tokenizer (chosen by the references' "
                "language)." if s.get("bleu_tokenize") else ""),
             note=True)
    for m in models:
        for note in m["notes"]:
            rep.text(f"{m['label']}: {note}", note=True)
    metrics = list(models[0]["task"])
    rep.table(["model"] + metrics, [[m["label"]] + [_ci(m["task"][k]) for k in metrics] for m in models])
    if len(models) > 1:
        rows = [[f"{m['label']} − {models[0]['label']}"] + [_ci(m["diff"][k], signed=True) for k in metrics]
                for m in models[1:]]
        rep.table(["difference"] + metrics, rows)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) * len(models) ** 0.5 + 2), 3.4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(metrics))]
        vals = [m["task"][k]["value"] for k in metrics]
        err = [[v - m["task"][k]["lo"] for v, k in zip(vals, metrics)], [m["task"][k]["hi"] - v for v, k in zip(vals, metrics)]]
        ax.bar(xs, vals, width, yerr=err, capsize=3, label=m["label"], color=COLORS[i % len(COLORS)])
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_title(f"{s['task']} (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    rep.figure("task", fig)


def _disagreements(rep: Report, models: list[dict], s: dict) -> None:
    rep.heading("Examples where the answers differ")
    rep.text(f"The first {len(s['disagreements'])} of the task's examples where the models' answers are not all "
             "the same; every example's answers are in predictions.jsonl.", note=True)
    if s["disagreements"]:
        key = "reference" if "reference" in s["disagreements"][0] else "passed"
        rows = [[d["where"], str(d.get("reference", d.get("passed"))), *(str(d["answers"][m["label"]]) for m in models)]
                for d in s["disagreements"]]
        rep.table(["example", key, *(m["label"] for m in models)], rows, text_columns=tuple(range(1, 2 + len(models))))


def _answers(rep: Report, models: list[dict]) -> None:
    rep.heading("Answers to the same prompts")
    rep.text("Greedy, and sampled at the configured temperature with a fixed seed per prompt.", note=True)
    for j, prompt in enumerate(a["prompt"] for a in models[0]["answers"]):
        rows = [[m["label"], m["answers"][j]["greedy"], m["answers"][j]["sampled"]] for m in models]
        rep.text(f"Prompt {j + 1}: {prompt}")
        rep.table(["model", "greedy", "sampled"], rows, text_columns=(1, 2))


def _ci(e: dict, signed: bool = False) -> str:
    v = f"{e['value']:+.3f}" if signed else f"{e['value']:.3f}"
    star = " *" if signed and (e["lo"] > 0 or e["hi"] < 0) else ""
    return f"{v} [{e['lo']:.3f}, {e['hi']:.3f}]{star}"


def _bars(ax, labels: list[str], values: list[float], title: str) -> None:
    ax.bar(range(len(values)), values, color=[COLORS[i % len(COLORS)] for i in range(len(values))])
    ax.set_xticks(range(len(values)), labels, rotation=15, fontsize=8)
    ax.set_title(title)
