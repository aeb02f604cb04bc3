"""What requests carry in: prompts, the tokenizer, images, grammars and tool calls."""

# The one prompt type (torch-free, so the Ingress may name it): a string, token ids, chat messages, or a dict
# with "prompt" + "images" or "messages". `inputs/prompts.py` says what each form means.
Prompt = str | list[int] | list[dict] | dict
