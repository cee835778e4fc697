"""An Ollama ``Modelfile`` beside the GGUF: ``ollama create NAME -f Modelfile`` then ``ollama run NAME``.

Ollama templates are Go templates, not Jinja, so the chat template is translated by family: ChatML
(``<|im_start|>role ... <|im_end|>``, SmolLM, Qwen) and Llama-3 (``<|start_header_id|>``) are written out,
with a default system prompt that the Jinja template inserts carried over as ``SYSTEM``. Any other template
is left to Ollama, which reads ``tokenizer.chat_template`` from the GGUF itself (said in a comment).
"""

from __future__ import annotations

import re

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""


def _default_system(template: str, start: str, end: str) -> str | None:
    """The literal system message a Jinja template inserts when the conversation has none."""
    match = re.search(re.escape(start) + r"system\n(.*?)" + re.escape(end), template, re.S)
    return match.group(1) if match and "{{" not in match.group(1) else None


def modelfile(gguf_name: str, chat_template: str | None, stop: list[str], parameters: dict[str, object]) -> str:
    """The text of a Modelfile for ``./gguf_name`` (a file name beside the Modelfile)."""
    lines = [f"# Ollama: ollama create <name> -f Modelfile && ollama run <name>  (written by minigiant export)", f"FROM ./{gguf_name}", ""]
    template, system = None, None
    if chat_template and "<|im_start|>" in chat_template:
        template, system = CHATML, _default_system(chat_template, "<|im_start|>", "<|im_end|>")
    elif chat_template and "<|start_header_id|>" in chat_template:
        template, system = LLAMA3, _default_system(chat_template, "<|start_header_id|>", "<|eot_id|>")
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
    elif chat_template:
        lines += ["# TEMPLATE: not translated; Ollama uses the chat template stored in the GGUF (tokenizer.chat_template)", ""]
    for token in dict.fromkeys(stop):  # unique, in order
        lines.append(f'PARAMETER stop "{token}"')
    for key, value in parameters.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
