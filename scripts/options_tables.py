"""Regenerate the option tables of docs/options.md from the declarations (``python scripts/options_tables.py``).

The tables sit between ``<!-- options:begin -->`` and ``<!-- options:end -->``; a test checks that they
equal what the declarations generate, so they cannot drift.
"""

import re
from pathlib import Path

from prune_cli.run.config import options_reference

OPTIONS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "options.md"


def main() -> None:
    text = OPTIONS_PAGE.read_text()
    block = f"<!-- options:begin -->\n{options_reference().strip()}\n<!-- options:end -->"
    if "<!-- options:begin -->" in text:
        text = re.sub(r"<!-- options:begin -->.*?<!-- options:end -->", lambda _: block, text, flags=re.S)
    else:
        raise SystemExit(f"{OPTIONS_PAGE} has no <!-- options:begin --> / <!-- options:end --> markers")
    OPTIONS_PAGE.write_text(text)
    print(f"wrote the option tables into {OPTIONS_PAGE}")


if __name__ == "__main__":
    main()
