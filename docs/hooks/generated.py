"""mkdocs hook: the pages whose text the code owns. ``<!-- cli-reference -->`` becomes every
`admmq` command's --help, from the parser itself, so the reference cannot drift from the CLI."""

from __future__ import annotations

import argparse


def cli_reference() -> str:
    from admmq_dist.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["## admmq", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, command in sub.choices.items():
        parts += [f"## admmq {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    return markdown
