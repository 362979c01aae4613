"""Chat for models without chat tokens: the plain-text template (roles as text, the reply
stops at the next role marker), how a template is chosen, and the same rendering in
render_chat, `gptkit chat` and the server."""

from __future__ import annotations

from pathlib import Path

import httpx
import jinja2
import openai
import pytest
import torch

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.checkpoint.format import save_checkpoint
from gptkit.errors import GptkitError
from gptkit.config import ModelConfig
from gptkit.inference.engine import Engine
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import EOT, ChatTemplate, CharTokenizer
from gptkit.text.chat import fit_conversation, render_chat, use_chat_template
from live_server import bpe_tokenizer, plain_tokenizer, serve

# A model overfit on a plain-text conversation: asked "hello", it answers " hi there" and then
# writes the next user turn, which the template's stop strings cut off.
DIALOGUE = "User: hello\nAssistant: hi there\n" * 40
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "bye"}]


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    tok = CharTokenizer(sorted(set(DIALOGUE)), specials=[EOT])  # no <|im_start|> / <|im_end|>, like GPT-2
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64))
    ids = torch.tensor(tok.encode(DIALOGUE))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # loss ~0.1
        ix = torch.randint(30, (8,)) * (len(DIALOGUE) // 40)  # windows start at a turn, as prompts do
        loss = model(torch.stack([ids[i:i + 48] for i in ix]), targets=torch.stack([ids[i + 1:i + 49] for i in ix]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(tmp_path_factory.mktemp("plain") / "plain", model.eval(), tok)


def test_plain_template_renders_roles_as_text_with_an_exact_mask():
    tok = plain_tokenizer()
    tok.chat_template = ChatTemplate(kind="plain")
    ids, mask = render_chat(tok, MESSAGES)
    text = "System: be brief\nUser: hello\nAssistant: hi there\nUser: bye\nAssistant:"
    assert tok.decode(ids) == text
    assert tok.decode(i for i, m in zip(ids, mask) if m) == " hi there\n"  # the reply and the line end
    jinja = jinja2.Template(tok.chat_template.jinja()).render(messages=MESSAGES, add_generation_prompt=True)
    assert jinja == text and tok.encode(jinja) == ids


def test_which_template_is_used():
    plain, chatml = plain_tokenizer(), bpe_tokenizer()
    assert use_chat_template(plain) == "fallback" and plain.chat_template.kind == "plain"
    assert plain.chat_template.stop == ["\nSystem:", "\nUser:", "\nAssistant:", "\nTool:"]
    assert use_chat_template(chatml) == "default" and chatml.chat_template.kind == "chatml"
    assert use_chat_template(chatml) == "checkpoint"  # now it has one
    assert use_chat_template(chatml, "plain") == "plain" and chatml.chat_template.kind == "plain"
    with pytest.raises(GptkitError, match="chatml needs the tokens"):
        use_chat_template(plain_tokenizer(), "chatml")
    with pytest.raises(GptkitError, match="expected one of auto, chatml, plain"):
        use_chat_template(chatml, "llama")
    # render_chat without a stored template picks the same one, and leaves the tokenizer alone
    fresh = plain_tokenizer()
    assert render_chat(fresh, MESSAGES)[0] == render_chat(plain, MESSAGES)[0] and fresh.chat_template is None


def test_a_long_conversation_drops_its_oldest_exchanges_to_fit():
    tok = plain_tokenizer()
    tok.chat_template = ChatTemplate(kind="plain")
    history = MESSAGES[1:] + [{"role": "assistant", "content": "ciao"}, {"role": "user", "content": "again"}]
    full, kept = fit_conversation(tok, "be brief", history, 8, 1000)
    assert kept == history and full == render_chat(tok, MESSAGES[:1] + history)[0]
    ids, kept = fit_conversation(tok, "be brief", history, 8, len(full) + 7)  # one token short
    assert kept == history[2:] and len(ids) + 8 <= len(full) + 7
    assert tok.decode(ids).startswith("System: be brief\nUser: bye\n")
    ids, kept = fit_conversation(tok, None, history, 8, 10)  # never room: the newest message stays
    assert kept == history[-1:] and tok.decode(ids) == "User: again\nAssistant:"


def test_server_chats_with_a_model_without_chat_tokens(plain_ckpt):
    from gptkit.server import ServedModel, create_app

    model = open_checkpoint(plain_ckpt).model
    tok = open_tokenizer(plain_ckpt)
    engine = Engine(model, max_batch=2, token_bytes=tok.token_bytes, eos_ids=[tok.eot_id])
    with serve(create_app([ServedModel("plain", engine, tok)])) as url:
        info = httpx.get(f"{url}/tokenizer_info").json()
        assert (info["chat_template_kind"], info["chat_template_source"]) == ("plain", "fallback")
        assert "Assistant:" in info["chat_template"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=30, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (" hi there", "stop")
        chunks = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=30, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " hi there"


def test_chat_command_uses_the_plain_template(plain_ckpt):
    from typer.testing import CliRunner

    from gptkit.cli import app

    r = CliRunner().invoke(app, ["chat", str(plain_ckpt), "--temperature", "0"], input="hello\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "plain-text template" in r.output and "model>  hi there\n" in r.output
