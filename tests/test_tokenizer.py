"""Tokenizer: encoding, BOS/EOS handling and chat templates, against HF transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from models.errors import InvalidRequestError, UnsupportedModelError
from models.tokenizer import Tokenizer

# Written for this test in the shape of Llama 3's template: header tokens, `| trim`,
# bos only before the first message, `raise_exception` for unknown roles.
LLAMA3_STYLE_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] | trim -%}
    {%- set messages = messages[1:] -%}
{%- else -%}
    {%- set system = 'Today is ' + strftime_now('%Y') + '.' -%}
{%- endif -%}
{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' -}}
{%- for message in messages -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{- raise_exception('unsupported role: ' + message['role']) -}}
    {%- endif -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
    {{- message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

# Qwen2 style: no BOS at all, a default system prompt, tool calls rendered with `tojson`.
QWEN2_STYLE_TEMPLATE = """\
{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if loop.index0 > 8 %}{% break %}{% endif %}
{{- '<|im_start|>' + message.role + '\\n' + message.content }}
{%- if message.tool_calls %}
{{- '<tool_call>' + message.tool_calls | tojson + '</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def _checkpoint(
    root: Path, source: Path, tokenizer_config: dict, *, extra: dict | None = None
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "tokenizer.json", root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, data in (extra or {}).items():
        (root / name).write_text(json.dumps(data))
    return root


def test_default_tokenizer_ids_and_round_trip(tok: Tokenizer) -> None:
    assert tok.vocab_size == 4096
    assert tok.bos_token_id == 0 and tok.eos_token_ids == frozenset({1, 3})
    for text in ["Hello, wörld", "日本語の文章 🚀🙂 👩🏽‍🔬", "def f(x):\n\treturn x ** 2", "\x00\x7f\u200b"]:
        ids = tok.encode(text)
        assert ids[:1] != [0]  # add_bos_token is false and no post-processor adds one
        assert tok.decode(ids) == text
    assert tok.decode([0, *tok.encode("hi"), 3]) == "hi"
    assert tok.decode([0, *tok.encode("hi"), 3], skip_special_tokens=False) == (
        "<|begin_of_text|>hi<|im_end|>"
    )
    assert tok.token_text(3) == "<|im_end|>"


def test_matches_hf_auto_tokenizer(tok: Tokenizer, tiny_model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The lighthouse keeper — 灯台守 🙂 said: «hello»"
    assert tok.encode(text) == hf(text).input_ids
    assert tok.decode(tok.encode(text)) == hf.decode(hf(text).input_ids)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    for gen in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    # The rendered prompt's special tokens encode as single ids.
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert ids[:2] == [0, 2] and ids.count(3) == 2


def test_llama3_style_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    backend = HFTokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    backend.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    # Llama 3's post-processor prepends BOS itself.
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    root = tmp_path / "llama3"
    root.mkdir()
    backend.save(str(root / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|begin_of_text|>", "special": True, "lstrip": False},
        "eos_token": {"content": "<|eot_id|>", "special": True},
        "add_bos_token": True,
        "chat_template": [
            {"name": "tool_use", "template": "{{ raise_exception('wrong template') }}"},
            {"name": "default", "template": LLAMA3_STYLE_TEMPLATE},
        ],
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4097]}))

    tok = Tokenizer.from_pretrained(root)
    eot = backend.token_to_id("<|eot_id|>")
    assert eot == 4098 and tok.eos_token_ids == frozenset({1, 4097, eot})
    assert tok.bos_token_id == 0
    assert tok.encode("hello").count(0) == 1 and tok.encode("hello")[0] == 0  # BOS exactly once
    assert tok.encode("hello", add_special_tokens=False)[:1] != [0]

    rendered = tok.apply_chat_template(
        [{"role": "system", "content": " Be kind. "}, {"role": "user", "content": "Hi\n"}]
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids[:2] == [0, backend.token_to_id("<|start_header_id|>")]
    assert ids.count(eot) == 2
    dated = tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert "Today is 20" in dated  # strftime_now is provided
    with pytest.raises(InvalidRequestError) as err:
        tok.apply_chat_template([{"role": "tool", "content": "42"}])
    assert err.value.param == "messages" and err.value.message == "unsupported role: tool"


def test_qwen2_style_no_bos_tojson_and_loop_controls(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = _checkpoint(
        tmp_path / "qwen",
        tiny_model_dir,
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": QWEN2_STYLE_TEMPLATE},
        extra={"generation_config.json": {"eos_token_id": [3, 1]}},
    )
    tok = Tokenizer.from_pretrained(root)
    assert tok.bos_token_id is None and tok.eos_token_ids == frozenset({1, 3})
    out = tok.apply_chat_template([{"role": "user", "content": "<b>café</b>"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<b>café</b><|im_end|>\n<|im_start|>assistant\n"
    )
    many = [{"role": "user", "content": str(i)} for i in range(20)]
    assert tok.apply_chat_template(many).count("<|im_start|>user") == 9  # {% break %} works

    calls = [{"name": "lookup", "arguments": {"q": "<things> & más"}}]
    chat = [
        {"role": "user", "content": "find it"},
        {"role": "assistant", "content": "", "tool_calls": calls},
    ]
    out = tok.apply_chat_template(chat, add_generation_prompt=False)
    # HF's tojson: no HTML escaping, non-ASCII kept.
    assert '<tool_call>[{"name": "lookup", "arguments": {"q": "<things> & más"}}]' in out
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(root)
    assert out == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ messages[0]['content'] + 1 }}", "could not apply the chat template"),
        ("{{ messages[5]['content'] | upper }}", "could not apply the chat template"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "could not apply the chat template"),
        ("{% set _ = messages.append(messages[0]) %}x", "could not apply the chat template"),
        ("{% for m in messages %}{{ m.content }", "does not compile"),
    ],
)
def test_template_failures_are_invalid_requests(
    tmp_path: Path, tiny_model_dir: Path, template: str, match: str
) -> None:
    root = _checkpoint(tmp_path, tiny_model_dir, {"chat_template": template})
    tok = Tokenizer.from_pretrained(root)  # a broken template fails requests, not loading
    with pytest.raises(InvalidRequestError, match=match) as err:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"


def test_no_template_and_missing_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(_checkpoint(tmp_path / "plain", tiny_model_dir, {}))
    assert not tok.has_chat_template and tok.bos_token_id is None and not tok.eos_token_ids
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(UnsupportedModelError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")


def test_add_bos_token_without_post_processor(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = {"bos_token": "<|begin_of_text|>", "add_bos_token": True}
    tok = Tokenizer.from_pretrained(_checkpoint(tmp_path, tiny_model_dir, config))
    assert tok.encode("hello")[0] == 0 and tok.encode("hello").count(0) == 1
    assert 0 not in tok.encode("hello", add_special_tokens=False)
