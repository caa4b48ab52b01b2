"""MkDocs hook: ``\\|`` inside a code span of a table row renders as ``|`` on the site, as it does on GitHub.

GitHub's tables need a pipe escaped even inside backticks; Python-Markdown's tables already keep a code span
whole, so the escape would show as a backslash. The pages stay written for GitHub.
"""

import re

CODE_SPAN = re.compile(r"`[^`\n]*`")


def unescape_pipes(row: str) -> str:
    """The row with ``\\|`` turned into ``|`` inside its code spans (text outside them is left as it is)."""
    return CODE_SPAN.sub(lambda span: span.group(0).replace("\\|", "|"), row)


def on_page_markdown(markdown: str, **_) -> str:
    """Unescape the pipes in the code spans of every table row of a page (fenced code is not a table row)."""
    lines, fenced = markdown.split("\n"), False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith("|"):
            lines[i] = unescape_pipes(line)
    return "\n".join(lines)
