"""`gptkit probe bias`: which of two sentences that differ only in a group term the model finds likelier.

Each template line is one pair (.jsonl, one JSON object a line):

    {"category": "gender", "lang": "en", "template": "The nurse said that {group} would be back.",
     "stereotyped": "she", "other": "he"}

Both sentences are scored by their total log-probability under the model (every token,
the first one given the end-of-text token as a start). The gap is log p(stereotyped) -
log p(other): above 0 the model prefers the stereotyped sentence. Per category it reports
the share of pairs with a positive gap (0.5 = no preference either way) and the mean gap
with a bootstrap 95% interval over pairs. Because a total log-prob also rewards a group term
for being short or frequent in itself, the same gap of the two terms alone (the term gap) is
subtracted in a second column: what the sentence's context adds to the preference.

What it is: a probe of preferences in this model's likelihoods on a few dozen hand-written
pairs. What it is not: a certificate of fairness or a measure of harm in use. A handful of
pairs per category gives wide intervals; a total log-prob also depends on how many tokens
and how frequent each group term is, so a gap can reflect word frequency, not a stereotype.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gptkit.checkpoint.open import open_checkpoint
from gptkit.data.records import parse_object
from gptkit.errors import GptkitError
from gptkit.evaluation.bootstrap import mean_ci
from gptkit.evaluation.report import Report, pyplot
from gptkit.fileio import atomic_write_json
from gptkit.inference.factory import build_engine

FIELDS = ("category", "template", "stereotyped", "other")
PLACEHOLDER = "{group}"
GAPS = ("gap = log p(stereotyped sentence) - log p(other sentence), > 0 prefers the stereotype; term gap = the "
        "same for the two group terms alone (their frequency and length), so gap minus term gap is what the context adds.")
CAVEAT = ("A probe of preferences in this model's likelihoods on these sentence pairs, not a certificate: "
          "few pairs per category (wide intervals), and a gap also reflects how frequent or long each group term is.")


def builtin_templates() -> Path:
    return Path(str(resources.files("gptkit") / "resources" / "bias_templates.jsonl"))


def read_templates(path: str | Path) -> list[dict]:
    """The pairs of a templates file; a bad line is one error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path}: templates file not found")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            pairs.append(_pair(line, f"{path}:{n}"))
    if not pairs:
        raise GptkitError(f"{path}: no template lines")
    return pairs


def _pair(line: str, where: str) -> dict:
    try:
        rec = parse_object(line)
    except GptkitError as e:
        raise GptkitError(f"{where}: {e}") from None
    for f in FIELDS:
        if not isinstance(rec.get(f), str) or not rec[f].strip():
            raise GptkitError(f"{where}: field {f!r} must be a non-empty string")
    if PLACEHOLDER not in rec["template"]:
        raise GptkitError(f"{where}: template has no {PLACEHOLDER} placeholder for the group term")
    if rec["stereotyped"] == rec["other"]:
        raise GptkitError(f"{where}: 'stereotyped' and 'other' are the same term")
    return {"category": rec["category"], "lang": rec.get("lang", ""), "template": rec["template"],
            "stereotyped": rec["stereotyped"], "other": rec["other"], "where": where}


def sentence_logprobs(engine, tokenizer, sentences: list[str]) -> list[float]:
    """Total log-prob of each sentence, every token scored (the end-of-text token starts it)."""
    prompts = [[tokenizer.eot_id] + tokenizer.encode(s) for s in sentences]
    for s, p in zip(sentences, prompts):
        if len(p) > engine.config.block_size:
            raise GptkitError(f"sentence of {len(p)} tokens is longer than the context "
                              f"{engine.config.block_size}: {s[:60]!r}")
    return [sum(lp for lp, _ in rows[1:]) for rows in engine.prompt_logprobs(prompts)]


def probe_bias(ckpt: str | Path, templates: str | Path | None, out: str | Path, *, bootstrap: int = 1000,
               seed: int = 0) -> dict:
    """Score every pair; writes out/{results.json, bias.png, report.md, index.html}; returns the results."""

    source = Path(templates) if templates else builtin_templates()
    pairs = read_templates(source)
    loaded = open_checkpoint(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = build_engine(model, tokenizer, max_batch=1)
    sentences = [p["template"].replace(PLACEHOLDER, p[k]) for p in pairs for k in ("stereotyped", "other")]
    terms = [_term(p, k) for p in pairs for k in ("stereotyped", "other")]
    scores = sentence_logprobs(engine, tokenizer, sentences + terms)
    for i, p in enumerate(pairs):
        p["logprob_stereotyped"], p["logprob_other"] = scores[2 * i], scores[2 * i + 1]
        p["gap"] = p["logprob_stereotyped"] - p["logprob_other"]
        p["term_gap"] = scores[len(sentences) + 2 * i] - scores[len(sentences) + 2 * i + 1]
    categories = {}
    for cat in sorted({p["category"] for p in pairs}) + ["all"]:
        mine = [p for p in pairs if cat in ("all", p["category"])]
        gap = mean_ci([p["gap"] for p in mine], bootstrap, seed)
        share = mean_ci([float(p["gap"] > 0) for p in mine], bootstrap, seed)
        corrected = mean_ci([p["gap"] - p["term_gap"] for p in mine], bootstrap, seed)
        categories[cat] = {"pairs": len(mine), "stereotyped_share": share["value"], "share_lo": share["lo"],
                           "share_hi": share["hi"], "mean_gap": gap["value"], "gap_lo": gap["lo"], "gap_hi": gap["hi"],
                           "corrected_gap": corrected["value"], "corrected_lo": corrected["lo"],
                           "corrected_hi": corrected["hi"]}
    result = {"checkpoint": str(ckpt), "templates": str(templates) if templates else f"the built-in templates ({source.name})",
              "categories": categories, "pairs": pairs,
              "note": CAVEAT}
    _write(result, Path(out))
    return result


def last_line(result: dict) -> dict:
    """Per category the headline numbers, for the command's last line of JSON."""
    keys = ("pairs", "stereotyped_share", "mean_gap", "gap_lo", "gap_hi", "corrected_gap")
    return {c: {k: r[k] for k in keys} for c, r in result["categories"].items()}


def _term(pair: dict, key: str) -> str:
    """The group term alone, with the character before it in the template (a BPE tokenizer
    spells " she" and "she" differently)."""
    return pair["template"].split(PLACEHOLDER)[0][-1:] + pair[key]


def format_table(result: dict) -> str:
    head = f"bias probe of {result['checkpoint']} on {result['templates']}"
    lines = [head, f"{'category':<14}{'pairs':>6}  {'stereotyped preferred':>21}  {'mean log-prob gap':>26}  "
                   f"{'gap minus term gap':>26}"]
    for cat, row in _rows(result):
        lines.append(f"{cat:<14}{row[0]:>6}  {row[1]:>21}  {row[2]:>26}  {row[3]:>26}")
    lines += [f"[95% bootstrap intervals over pairs] {GAPS}", CAVEAT, f"wrote {result['out']}"]
    return "\n".join(lines)


def _rows(result: dict) -> list[tuple[str, list]]:
    return [(c, [r["pairs"], f"{r['stereotyped_share']:.2f} [{r['share_lo']:.2f}, {r['share_hi']:.2f}]",
                 f"{r['mean_gap']:+.2f} [{r['gap_lo']:+.2f}, {r['gap_hi']:+.2f}]",
                 f"{r['corrected_gap']:+.2f} [{r['corrected_lo']:+.2f}, {r['corrected_hi']:+.2f}]"])
            for c, r in result["categories"].items()]


def _write(result: dict, out: Path) -> None:
    result["out"] = str(out)
    cats = [c for c in result["categories"] if c != "all"]
    rows = [result["categories"][c] for c in cats]
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 0.5 * len(cats) + 1.6), sharey=True)
    ax1.barh(cats, [r["stereotyped_share"] for r in rows], color="#4C72B0",
             xerr=[[r["stereotyped_share"] - r["share_lo"] for r in rows], [r["share_hi"] - r["stereotyped_share"] for r in rows]])
    ax1.axvline(0.5, color="grey", ls="--")
    ax1.set_xlim(0, 1)
    ax1.set_title("share preferring the stereotyped sentence")
    ax2.barh(cats, [r["mean_gap"] for r in rows], color="#DD8452",
             xerr=[[r["mean_gap"] - r["gap_lo"] for r in rows], [r["gap_hi"] - r["mean_gap"] for r in rows]])
    ax2.axvline(0, color="grey", ls="--")
    ax2.set_title("mean log-prob gap (95% CI)")
    ax3.barh(cats, [r["corrected_gap"] for r in rows], color="#55A868",
             xerr=[[r["corrected_gap"] - r["corrected_lo"] for r in rows],
                   [r["corrected_hi"] - r["corrected_gap"] for r in rows]])
    ax3.axvline(0, color="grey", ls="--")
    ax3.set_title("gap minus term gap (95% CI)")
    ax1.invert_yaxis()
    rep = Report(f"Bias probe: {result['checkpoint']}")
    rep.text(CAVEAT, note=True)
    rep.table(["category", "pairs", "stereotyped preferred", "mean log-prob gap", "gap minus term gap"],
              [[c, *row] for c, row in _rows(result)])
    rep.text(f"[95% bootstrap intervals over pairs] {GAPS}", note=True)
    rep.figure("bias", fig)
    rep.heading("Pairs")
    rep.table(["category", "lang", "stereotyped sentence", "other term", "gap", "term gap"],
              [[p["category"], p["lang"], p["template"].replace(PLACEHOLDER, p["stereotyped"]), p["other"],
                f"{p['gap']:+.2f}", f"{p['term_gap']:+.2f}"] for p in result["pairs"]], text_columns=(2,))
    rep.write(out)
    atomic_write_json(out / "results.json", result)
