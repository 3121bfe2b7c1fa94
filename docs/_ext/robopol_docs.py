"""Local Sphinx directives for the robopol-clean docs.

``.. cli-help::``
    The command-line reference, generated at build time from
    :func:`robopol_clean.cli.build_parser`: one section with the ``--help`` text of the
    program and one per subcommand, in the parser's order. Nothing is copied by hand, so
    the page cannot drift from the code.

``.. optional-image:: path``
    An image that is shown only when the file exists (e.g. ``_static/demo.png``, written by
    ``robopol-clean demo``); otherwise the directive's content is shown instead. Keeps
    ``sphinx-build -W`` green on a fresh checkout.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_id

#: Width of the rendered help text (argparse reads COLUMNS).
HELP_WIDTH = 88


@contextmanager
def _columns(width: int):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser):
    """(name, one-line help, subparser) for each subcommand, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


class CLIHelpDirective(SphinxDirective):
    """Render ``build_parser()``'s help, one section per (sub)command."""

    has_content = False
    option_spec = {
        "module": directives.unchanged,  # default: robopol_clean.cli
        "function": directives.unchanged,  # default: build_parser
        "width": directives.positive_int,
    }

    def _section(self, title: str, text: str, intro: str = "") -> nodes.section:
        section = nodes.section()
        section["ids"].append(make_id(self.env, self.state.document, "cli", title))
        section["names"].append(nodes.fully_normalize_name(title))
        section += nodes.title(title, "", nodes.literal(title, title))
        if intro:
            section += nodes.paragraph(intro, intro)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        section += block
        self.state.document.note_implicit_target(section, section)
        return section

    def run(self):
        import importlib

        module = importlib.import_module(self.options.get("module", "robopol_clean.cli"))
        build = getattr(module, self.options.get("function", "build_parser"))
        width = self.options.get("width", HELP_WIDTH)
        with _columns(width):
            parser = build()
            prog = parser.prog
            out = [self._section(prog, parser.format_help().rstrip())]
            for name, short, sub in _subcommands(parser):
                intro = (short[0].upper() + short[1:] + ".") if short else ""
                out.append(self._section(f"{prog} {name}", sub.format_help().rstrip(), intro))
        self.env.note_dependency(module.__file__)
        return out


class OptionalImageDirective(SphinxDirective):
    """An image if the file exists, else the directive's content (a note)."""

    required_arguments = 1
    has_content = True
    option_spec = {"alt": directives.unchanged, "width": directives.unchanged}

    def run(self):
        rel = self.arguments[0]
        _, abspath = self.env.relfn2path(rel, self.env.docname)
        if Path(abspath).is_file():
            lines = [f".. image:: {rel}"]
            lines += [f"   :{k}: {v}" for k, v in self.options.items()]
        else:
            lines = list(self.content)
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]),
                                self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("cli-help", CLIHelpDirective)
    app.add_directive("optional-image", OptionalImageDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
