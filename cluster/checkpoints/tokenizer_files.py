"""Tokenizer files for random Llama 4 checkpoints, in the layout of the released Hugging Face tokenizer.

The tokenizer is a byte-level BPE (the released pre-tokenizer regex, `ignore_merges`, ByteLevel decoder) trained
deterministically on the small corpus below to ``NUM_BASE_TOKENS`` entries (256 bytes + merges). The Llama 4
special tokens follow it in released order, so a special token's id is ``NUM_BASE_TOKENS + (released_id - 200000)``
(``<|begin_of_text|>`` 512, ``<|eot|>`` 520, ``<|patch|>`` 604). Only the first 93 released special tokens
(200000..200092, up to ``<|patch|>``) are kept; the 1041 further vision-reserved and the reasoning tokens are not.

BOS: like the released tokenizer, ``tokenizer.json`` has a ``TemplateProcessing`` post-processor that prepends
``<|begin_of_text|>`` when ``add_special_tokens=True``; the chat template also starts with ``bos_token``, so a
rendered chat prompt must be encoded with ``add_special_tokens=False`` (transformers does the same).
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOT_TOKEN = "<|eot|>"
PAD_TOKEN = "<|finetune_right_pad|>"
NUM_BASE_TOKENS = 512

# The released split regex (tiktoken's o200k pattern).
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _reserved(name: str, count: int, start: int) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


# Released order: ids 200000..200092 of the Llama 4 vocabulary.
SPECIAL_TOKENS: list[str] = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    + ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    + _reserved("text_post_train", 6, 0)
    + ["<|python_start|>", "<|python_end|>", PAD_TOKEN]
    + _reserved("text_post_train", 61, 8)
    + ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
       "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    + _reserved("vision", 4, 2)
    + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
)
NUM_TOKENS = NUM_BASE_TOKENS + len(SPECIAL_TOKENS)


def special_token_id(token: str) -> int:
    """Id of a Llama 4 special token in this tokenizer (``ValueError`` for names it does not hold)."""
    if token not in SPECIAL_TOKENS:
        raise ValueError(f"{token!r} is not one of the {len(SPECIAL_TOKENS)} special tokens of this tokenizer")
    return NUM_BASE_TOKENS + SPECIAL_TOKENS.index(token)


# Same output as the released template for plain, image and tool conversations, without its tool-prompt scaffolding.
CHAT_TEMPLATE = """\
{#- Llama 4 chat format: <|begin_of_text|>, then per message
    <|header_start|>ROLE<|header_end|>\\n\\nCONTENT<|eot|>.
    CONTENT is a string or a list of parts {"type": "text", "text": ...} / {"type": "image"};
    an image part renders as <|image|>, which the processor expands into patch tokens. -#}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is not none -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- '<|header_start|>system<|header_end|>\\n\\n' + render_content(message['content']) | trim + '<|eot|>' -}}
    {%- elif message['role'] in ['tool', 'ipython'] -%}
        {{- '<|header_start|>ipython<|header_end|>\\n\\n' + message['content'] | tojson + '<|eot|>' -}}
    {%- elif message.get('tool_calls') -%}
        {{- '<|header_start|>assistant<|header_end|>\\n\\n<|python_start|>' -}}
        {{- render_content(message['content']) + '<|python_end|>' -}}
        {%- for call in message['tool_calls'] -%}
            {{- '{"name": "' + call['function']['name'] + '", "parameters": ' -}}
            {{- call['function']['arguments'] | tojson + '}' -}}
        {%- endfor -%}
        {{- '<|eot|>' -}}
    {%- else -%}
        {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' -}}
        {{- render_content(message['content']) + '<|eot|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}
{%- endif -%}
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving system for large language models takes requests from many
users at once, batches their tokens together, and streams the generated text back as soon as each token is ready.
Mixture-of-experts models route every token to one expert among many, so only a small part of the weights is used
for any single token, while the whole model still holds the knowledge of all experts together.
Attention layers keep a cache of keys and values for every sequence; the cache is split into blocks so that memory
is handed out in small pieces and returned when a request finishes. Chunked attention lets most layers look only
at the recent past, which keeps the cache small even when the context is very long.
In the morning the market opens early; farmers bring apples, pears, bread, cheese and fresh flowers. Children
play in the park, and their parents read the news, drink coffee and talk about the weather, the prices, the plans
for the weekend, and the football match of the evening. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 3.14159.
Code: def generate(prompt, max_tokens=16): return model(prompt)[-1] if prompt else None  # {"key": [1, 2]}
Le café est très bon à Paris, où l'été est chaud et l'hiver doux. Ça coûte cher, mais c'est délicieux !
Über den Wolken muss die Freiheit wohl grenzenlos sein. Schöne Grüße aus München, die Straße ist groß.
El niño comió una manzana en la mañana; ¿dónde está la biblioteca? ¡Qué día tan bonito!
São Paulo é uma cidade enorme, e a população fala português com acentuação: ação, coração, irmã.
Ελληνικά γράμματα: αλφα, βήτα, γάμμα. Русский язык: привет, мир, спасибо, до свидания.
日本語の文章です。東京は大きな都市で、毎日たくさんの人が電車に乗ります。今日は天気がいいですね。
中文也很重要：你好，世界！我们今天学习语言模型，明天去北京。谢谢你的帮助。
한국어 문장도 있습니다. 안녕하세요, 만나서 반갑습니다.
Emoji: 🙂 😀 🚀 🎉 ❤️ 👍🏽 🦙 🐍 🌍 ✨ — and symbols: € £ ¥ © ® ™ ∑ ∞ ≤ ≥ → ← ✓.
"""


def build_tokenizer():
    """Train the byte-level BPE on ``CORPUS`` and add the special tokens; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_BASE_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    if tokenizer.get_vocab_size() != NUM_BASE_TOKENS:
        raise RuntimeError(
            f"BPE training produced {tokenizer.get_vocab_size()} tokens, expected {NUM_BASE_TOKENS}; "
            "the corpus in tokenizer_files.py is too small for that many merges"
        )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, special_token_id(BOS_TOKEN))],
        ),
    ])
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """The ``tokenizer_config.json`` dict (released layout, chat template included)."""
    added = {
        str(special_token_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT_TOKEN,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(out_dir: str | Path, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and ``chat_template.jinja``.

    The chat template is in both ``tokenizer_config.json`` (released layout) and ``chat_template.jinja`` (where
    transformers 5 saves it). Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                               "chat_template.jinja")]
    build_tokenizer().save(str(paths[0]), pretty=True)
    paths[1].write_text(json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n")

    def entry(token: str) -> dict:
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map = {"bos_token": entry(BOS_TOKEN), "eos_token": entry(EOT_TOKEN), "pad_token": entry(PAD_TOKEN)}
    paths[2].write_text(json.dumps(special_map, indent=2) + "\n")
    paths[3].write_text(CHAT_TEMPLATE)
    return paths
