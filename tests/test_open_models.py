"""The later decoders (rotary positions, RMSNorm, SwiGLU, grouped-query attention, QK-norm, QKV
biases, untied heads): random tiny Llama, Qwen2, Qwen3 and Mistral models built locally with
transformers, imported, compared (logits, greedy tokens through the engine's KV cache), exported
and loaded back by transformers. Odd shapes on purpose: 6 query heads over 2 KV heads, a head
width of 10, a vocabulary that is not a multiple of 8."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from gptkit.checkpoint.hf import export_hf, import_hf  # noqa: E402
from gptkit.checkpoint.open import open_checkpoint  # noqa: E402
from gptkit.config import ModelConfig, SampleConfig  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402
from gptkit.inference.engine import Engine  # noqa: E402
from gptkit.model.gpt import GPT, KVCache  # noqa: E402
from gptkit.text.tokenizer import BPETokenizer  # noqa: E402

TOL = 1e-4
VOCAB = 301  # > the tokenizer's 300, and odd
SHAPE = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=90, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-6, rope_theta=500.0,
             initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=False)),
    # Qwen3 sets its head width apart from hidden_size / heads
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE, head_dim=14,
                                                                            tie_word_embeddings=False)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE, sliding_window=None)),
}


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(["The quick brown fox jumps over the lazy dog. 我有一个梦想。 def f(x): return x\n"] * 20,
                              vocab_size=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """saved(name): (the random transformers model of that family, the folder it was saved to)."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            hf = FAMILIES[name]().eval()
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            tok.tok.save(str(folder / "tokenizer.json"))
            made[name] = hf, folder
        return made[name]
    return get


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, saved):
    """(name, the transformers model, its saved folder, the imported gptkit checkpoint folder)."""
    hf, folder = saved(request.param)
    out = tmp_path_factory.mktemp(f"{request.param}-gptkit") / "ckpt"
    import_hf(folder, out)
    return request.param, hf, folder, out


def test_logits_equal_transformers(family):
    name, hf, _, out = family
    model = open_checkpoint(out).model
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    assert diff < TOL, (name, diff)
    cfg = model.config
    assert (cfg.pos_encoding, cfg.norm, cfg.activation, cfg.n_kv_head) == ("rope", "rmsnorm", "swiglu", 2)
    assert cfg.qk_norm == (name == "qwen3") and bool(cfg.qkv_bias) == (name == "qwen2")


def test_greedy_tokens_through_the_engine_equal_transformers(family):
    name, hf, _, out = family
    model = open_checkpoint(out).model
    prompt = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 7:].tolist()
    [got] = Engine(model, eos_ids=()).generate(prompt[0].tolist(), SampleConfig(max_tokens=32, temperature=0))
    assert got.token_ids == expected, name


def test_the_kv_cache_holds_only_the_kv_heads(family):
    _, _, _, out = family
    cfg = open_checkpoint(out).model.config
    cache = KVCache.allocate(cfg, 3)
    assert cache.k.shape == (cfg.n_layer, 3, 2, cfg.block_size, cfg.head_dim)  # 2 KV heads, not 6


def test_export_loads_in_transformers_and_round_trips_byte_equal(family, tmp_path):
    name, hf, folder, out = family
    summary = export_hf(out, tmp_path / "hf")
    # Mistral with no sliding window computes exactly what Llama does, and goes out as one
    assert summary["architecture"] == ("LlamaForCausalLM" if name == "mistral" else hf.config.architectures[0])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert (back(idx).logits - hf(idx).logits).abs().max().item() < TOL
    original = load_file(str(folder / "model.safetensors"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) == set(original) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    assert all(torch.equal(exported[k], original[k]) for k in exported), name
    import_hf(tmp_path / "hf", tmp_path / "again")
    export_hf(tmp_path / "again", tmp_path / "hf2")
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


def test_modern_options_from_scratch_decode_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_kv_head=1, n_embd=32, pos_encoding="rope",
                      norm="rmsnorm", activation="relu2", qk_norm=True, tie_embeddings=False, bias=False)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(cfg, 2)
        steps = [model(idx[:, :12], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    logits, maps = model.attention_maps(idx)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert maps.shape == (2, 2, 4, 20, 20)  # every query head, though keys are shared


@pytest.mark.parametrize("name, change, message", [
    ("qwen3", {"architectures": ["Qwen3MoeForCausalLM"]}, "architectures=['Qwen3MoeForCausalLM'] is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type='llama3' is not"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, "rope_type='dynamic' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}},
     "rope_parameters.beta_fast=16 is not supported for yarn"),
    ("llama", {"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor=None: expected a number"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("mistral", {"sliding_window": 32}, "sliding_window=32 is shorter than max_position_embeddings=96"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
])
def test_what_cannot_be_computed_exactly_is_refused_in_one_line(saved, tmp_path, name, change, message):
    _, folder = saved(name)
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(GptkitError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        import_hf(bad, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_missing_and_misshapen_tensors_are_named(family, tmp_path):
    from safetensors.torch import save_file

    name, _, folder, _ = family
    state = load_file(str(folder / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (bad / f).write_bytes((folder / f).read_bytes())
    gone = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in state.items() if k != gone}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GptkitError, match=f"missing key\\(s\\) {gone}"):
        import_hf(bad, tmp_path / "out")
    state["model.layers.0.self_attn.o_proj.weight"] = state["model.layers.0.self_attn.o_proj.weight"][:, :-1].contiguous()
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GptkitError, match="h.0.attn.c_proj.weight has shape"):
        import_hf(bad, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_chat_lora_merge_serve_and_export_of_an_imported_model(saved, tmp_path, name):
    """Downstream of the import: LoRA fine-tuning on chat data, merge, chat through the engine, the
    int8 engine, attention maps per query head, and the merged model exported back to transformers."""
    from typer.testing import CliRunner

    from gptkit.checkpoint.open import open_tokenizer
    from gptkit.cli import app
    from gptkit.inference.factory import build_engine
    from gptkit.text.chat import render_chat

    hf, folder = saved(name)
    run = CliRunner().invoke
    assert run(app, ["import-hf", str(folder), str(tmp_path / "base")]).exit_code == 0
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                            for i in range(24)), encoding="utf-8")
    r = run(app, ["finetune", str(tmp_path / "base"), str(chat), "--out", str(tmp_path / "lora"), "--lora-rank", "4",
                  "--max-steps", "20", "--lr", "1e-2", "--warmup-steps", "2", "--eval-interval", "10",
                  "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    r = run(app, ["merge-lora", str(tmp_path / "lora"), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = open_checkpoint(tmp_path / "merged").model
    tok = open_tokenizer(tmp_path / "merged")
    assert merged.config.tie_embeddings == hf.config.tie_word_embeddings
    ids, _ = render_chat(tok, [{"role": "user", "content": "hi 3"}])
    [reply] = build_engine(merged, tok, keep_model=True).generate(ids, SampleConfig(max_tokens=8, temperature=0))
    assert reply.finish_reason in ("stop", "length") and reply.token_ids
    [quantized] = build_engine(merged, tok, quantize="int8", keep_model=True).generate(
        ids, SampleConfig(max_tokens=8, temperature=0))
    assert quantized.token_ids
    logits, maps = merged.attention_maps(torch.tensor([ids]))
    assert maps.shape[2] == 6 and torch.allclose(maps.sum(-1), torch.ones(()))  # all 6 query heads
    r = run(app, ["export-hf", str(tmp_path / "merged"), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(torch.tensor([ids])).logits - logits).abs().max().item() < TOL


def test_an_untied_head_grows_with_the_vocabulary():
    from gptkit.model.heads import resize_vocab

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False))
    wte, head = model.wte.weight.clone(), model.lm_head.weight.clone()
    resize_vocab(model, 14)
    assert model.lm_head.weight is not model.wte.weight and model.lm_head.weight.shape == (14, 8)
    assert torch.equal(model.lm_head.weight[:11], head) and torch.equal(model.wte.weight[:11], wte)
    torch.testing.assert_close(model.lm_head.weight[11:], head.mean(0).expand(3, 8))


# A template in the form of Qwen2.5's (ChatML with a default system message), and one in the form
# of Zephyr's (role markers as text, each turn closed by the eos token).
QWEN_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
             "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
             "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
             "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
ZEPHYR_LIKE = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content']"
               " + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + "
               "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + "
               "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
               "{% endif %}\n{% endfor %}")


@pytest.mark.parametrize("template, end", [(QWEN_LIKE, "<|im_end|>"), (ZEPHYR_LIKE, "<|endoftext|>")])
def test_the_models_own_chat_template_gives_transformers_ids(saved, tmp_path, template, end):
    from gptkit.checkpoint.open import open_tokenizer
    from gptkit.inference.factory import eos_ids
    from gptkit.text.chat import render_chat

    hf, folder = saved("qwen2")
    src = tmp_path / "src"
    src.mkdir()
    for f in folder.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": end}))
    import_hf(src, tmp_path / "ckpt")
    tok = open_tokenizer(tmp_path / "ckpt")
    assert tok.chat_template.kind == "jinja" and tok.chat_template.end == end
    assert tok.special_id(end) in eos_ids(tok)  # a reply ends on the template's end-of-turn token
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    messages = [{"role": "user", "content": "hi 我有 <|im_end|> x"}, {"role": "assistant", "content": "hello 3"},
                {"role": "user", "content": "def f(x): return x"}]
    for convo, gen in ((messages, True), (messages[:2], False)):
        ids, mask = render_chat(tok, convo, add_generation_prompt=gen)
        expected = hf_tok.apply_chat_template(convo, add_generation_prompt=gen, tokenize=False)
        # the rendered text agrees; a message that spells <|im_end|> stays text (transformers would
        # make it the special token: gptkit encodes message content with special tokens off)
        assert tok.decode(ids) == expected
        assert ids.count(tok.special_id("<|im_end|>")) == expected.count("<|im_end|>") - 1  # the user's is text
        safe = [{**m, "content": m["content"].replace("<|im_end|>", "")} for m in convo]
        assert render_chat(tok, safe, add_generation_prompt=gen)[0] == hf_tok.apply_chat_template(
            safe, add_generation_prompt=gen, tokenize=True, return_dict=False)
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == "hello 3" + end  # the reply and its end-of-turn token, nothing else
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.apply_chat_template(messages, tokenize=False) == hf_tok.apply_chat_template(messages, tokenize=False)


def test_the_tokenizer_gives_transformers_ids(saved):
    from gptkit.text.tokenizer import load_tokenizer

    _, folder = saved("llama")
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    text = "Hello, world! 你好，世界。 我有一个梦想 🙂\ndef add(a, b):\n    return a + b  # ok"
    assert ours.encode(text, special=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text)) == text


def test_the_server_chats_with_an_imported_qwen3_through_the_openai_client(saved, tmp_path):
    """The model's own template (a Qwen-style one in tokenizer_config.json), its end token as the
    stop, the official client, streaming included."""
    import httpx
    import openai
    from live_server import serve

    from gptkit.checkpoint.open import open_tokenizer
    from gptkit.inference.factory import build_engine
    from gptkit.server import ServedModel, create_app
    from gptkit.text.chat import render_chat

    _, folder = saved("qwen3")
    src = tmp_path / "src"
    src.mkdir()
    for f in folder.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_LIKE, "eos_token": "<|im_end|>"}))
    import_hf(src, tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    tok = open_tokenizer(tmp_path / "ckpt")
    engine = build_engine(ckpt.model, tok, max_batch=2, keep_model=True)
    messages = [{"role": "user", "content": "hi 我有"}]
    [alone] = engine.generate(render_chat(tok, messages)[0], SampleConfig(max_tokens=12, temperature=0))
    with serve(create_app([ServedModel("qwen3", engine, tok)])) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="qwen3", messages=messages, max_tokens=12, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="qwen3", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
        info = httpx.get(f"{url}/tokenizer_info").json()
    assert (info["chat_template_kind"], info["chat_template_source"]) == ("jinja", "checkpoint")
    assert info["chat_template"] == QWEN_LIKE
    assert r.choices[0].message.content == streamed == tok.decode(alone.token_ids)
    assert r.choices[0].finish_reason == ("stop" if alone.finish_reason == "stop" else "length")


def test_rope_scaling_stretches_the_trained_angles():
    from gptkit.model.gpt import rope_tables

    base = ModelConfig(vocab_size=11, block_size=64, n_layer=1, n_head=2, n_embd=16, pos_encoding="rope")
    cos, _ = rope_tables(base)
    linear, _ = rope_tables(ModelConfig(**{**base.__dict__, "rope_scaling": "linear", "rope_factor": 2.0}))
    torch.testing.assert_close(linear[0::2][:32], cos[:32])  # position 2p turns as p did
    ntk, _ = rope_tables(ModelConfig(**{**base.__dict__, "rope_scaling": "ntk", "rope_factor": 4.0}))
    torch.testing.assert_close(ntk[:, 0], cos[:, 0])  # the fastest pair turns as before
    slowest = 10000.0 ** (-6 / 8)  # pair 3 of a head of 8; NTK's base is theta * 4^(8/6)
    torch.testing.assert_close(ntk[:, 3], torch.cos(torch.arange(64.0, dtype=torch.float64) * slowest / 4).float())
    with pytest.raises(GptkitError, match="rope_factor=2.0: expected >= 1, and 1 with rope_scaling='none'"):
        ModelConfig(rope_factor=2.0)


def test_a_linearly_scaled_llama_matches_transformers(tmp_path, tok):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SHAPE, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model = open_checkpoint(tmp_path / "ckpt").model
    assert (model.config.rope_scaling, model.config.rope_factor) == ("linear", 2.0)
    idx = torch.randint(0, VOCAB, (1, 90))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < TOL
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(idx).logits - hf(idx).logits).abs().max().item() < TOL


@pytest.mark.parametrize("family, rope, legacy", [
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 24}, False),
    ("qwen2", {"rope_type": "yarn", "factor": 3.0}, False),  # trained context: max_position_embeddings
    ("qwen2", {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48}, True),  # Qwen2.5's README form
])
def test_yarn_matches_transformers_and_round_trips(tmp_path, tok, family, rope, legacy):
    """YaRN from config.json (rope_parameters, or the older rope_scaling with "type"): logits within TOL of
    transformers past the trained context, and the export loads in transformers with the same logits."""
    torch.manual_seed(0)
    cls, conf = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                 "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
    params = {"rope_theta": 500.0, "rope_type": rope.get("rope_type", rope.get("type")),
              **{k: v for k, v in rope.items() if k != "type"}}
    hf = cls(conf(**SHAPE, rope_parameters=params)).eval()
    hf.save_pretrained(tmp_path / "hf")
    if legacy:  # as a pre-5 transformers config.json: the scaling under rope_scaling, theta beside it
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        cfg["rope_scaling"], cfg["rope_theta"] = rope, 500.0
        del cfg["rope_parameters"]
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    tok.tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model = open_checkpoint(tmp_path / "ckpt").model
    trained = rope.get("original_max_position_embeddings", SHAPE["max_position_embeddings"])
    assert (model.config.rope_scaling, model.config.rope_factor, model.config.rope_original_context) == \
        ("yarn", rope["factor"], trained)
    idx = torch.randint(0, VOCAB, (1, 90))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < TOL
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        assert (back(idx).logits - hf(idx).logits).abs().max().item() < TOL


def test_yarn_keeps_fast_pairs_and_slows_the_slow_ones():
    from gptkit.model.gpt import rope_tables

    base = ModelConfig(vocab_size=11, block_size=4096, n_layer=1, n_head=1, n_embd=64, pos_encoding="rope")
    cos, _ = rope_tables(base)
    yarn_cos, _ = rope_tables(ModelConfig(**{**base.__dict__, "rope_scaling": "yarn", "rope_factor": 4.0}))
    scale = 0.1 * math.log(4.0) + 1  # attention sharpened back
    torch.testing.assert_close(yarn_cos[:, 0] / scale, cos[:, 0])  # the fastest pair turns as before
    slowest = 10000.0 ** (-62 / 64)  # turns less than once over the 1,024 trained positions: slowed 4x
    torch.testing.assert_close(yarn_cos[:, 31] / scale,
                               torch.cos(torch.arange(4096.0, dtype=torch.float64) * slowest / 4).float())
    with pytest.raises(GptkitError, match="rope_original_context=512: expected a positive context, with "
                                          "rope_scaling='yarn' only"):
        ModelConfig(**{**base.__dict__, "rope_original_context": 512})


@pytest.mark.parametrize("source, message", [
    ("{% for m in messages %}", "does not parse"),
    ("{{ raise_exception('only user turns') }}", "failed: only user turns"),
    ("{{ messages[0]['content'] + 1 }}", "failed"),  # the template's own logic: a TypeError
])
def test_a_broken_chat_template_is_one_line(tok, source, message):
    from gptkit.text.chat import render_chat
    from gptkit.text.tokenizer import ChatTemplate

    tok.chat_template = ChatTemplate(kind="jinja", source=source, end="<|im_end|>")
    try:
        with pytest.raises(GptkitError, match=message) as e:
            render_chat(tok, [{"role": "user", "content": "hi"}])
        assert "\n" not in str(e.value)
    finally:
        tok.chat_template = None
