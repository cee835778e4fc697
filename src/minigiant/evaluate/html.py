"""``report.html``: the whole evaluation on one self-contained page (plots inlined as base64 PNG, styles
inline, no script and no external asset), so it can be mailed or attached to an issue as one file."""

from __future__ import annotations

import base64
import html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; white-space: nowrap; }
td.answer { white-space: pre-wrap; max-width: 28em; }
tr.reference td { background: #fbf7e8; }
img { max-width: 48%; margin-right: 1%; }
p.note { max-width: 60em; color: #555; }
"""


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1, reference_row: bool = True) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="reference"' if reference_row and i == 0 else ""
        cells = "".join(f'<td class="num">{html.escape(c)}</td>' if j >= numeric_from else f"<td>{html.escape(c)}</td>" for j, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _answers(results: list[dict]) -> str:
    """One row per prompt, one column per model: the answers side by side."""
    prompts = list(dict.fromkeys(a["prompt"] for r in results for a in r.get("answers") or []))
    if not prompts:
        return ""
    out = ["<h2>Answers side by side</h2>", '<p class="note">Greedy decoding, so every run gives the same text. '
           "The number under an answer is the teacher's NLL per token of it; ✂ marks an answer cut at the token limit.</p>", "<table>",
           "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(r['name'])}</th>" for r in results) + "</tr>"]
    for prompt in prompts:
        cells = [f'<td class="answer">{html.escape(prompt)}</td>']
        for r in results:
            answer = next((a for a in r.get("answers") or [] if a["prompt"] == prompt), None)
            if answer is None:
                cells.append("<td>–</td>")
                continue
            note = []
            if answer.get("judge_nll") is not None:
                note.append(f"{answer['judge_nll']:.2f}")
            if answer.get("truncated"):
                note.append("✂")
            small = f"<br><small>{' '.join(note)}</small>" if note else ""
            cells.append(f'<td class="answer">{html.escape(answer["answer"]) or "<i>(empty)</i>"}{small}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def html_report(results: list[dict], title: str, plots: dict[str, bytes]) -> str:
    from .report import _rows, all_columns, explanation

    columns = all_columns(results)
    header = ["model", "made by", *(h for h, _, _ in columns)]
    rows = [[r[0], " → ".join(filter(None, res.get("lineage_stages") or [])) or "–", *r[1:]] for r, res in zip(_rows(results, columns), results)]
    images = "".join(
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' for name, png in plots.items()
    )
    note = html.escape(explanation(results)).replace("**", "") if results else ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f'<p class="note">{note}</p>',
        _table(header, rows, numeric_from=2), f"<h2>Quality against size and speed</h2><div>{images}</div>", _answers(results),
        "</body></html>", "",
    ])
