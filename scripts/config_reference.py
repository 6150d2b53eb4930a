#!/usr/bin/env python
"""Generate docs/CONFIG.md, the reference of every run-config key, from the schema dataclasses.

The schema is the ``Config`` dataclass tree of mardini/training/config.py. For every field this script reads the
type and the default from the dataclass and the description from the trailing ``# comment`` on the field's line
in the dataclass source (found with ``inspect.getsource`` + ``tokenize``). A field without a comment is an error
that names it: every key must explain itself.

    python scripts/config_reference.py            # (re)write docs/CONFIG.md
    python scripts/config_reference.py --check    # exit 1 with a diff if docs/CONFIG.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "CONFIG.md"

if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


class MissingCommentError(ValueError):
    """A schema field has no trailing comment to document it."""


# Descriptions for fields whose source line still lacks its comment, keyed "Class.field". Only for fields in files
# whose owner has yet to add the comment; a comment in the source always wins, and this script warns about entries
# that have become unnecessary. Add nothing here for new fields: write the comment on the field's line.
PENDING_COMMENTS: dict[str, str] = {}


# ----------------------------------------------------------------------------------------------------------------
# reading the source


def field_comments(cls: type) -> dict[str, tuple[int, str]]:
    """{field name: (line number in its file, trailing comment)} for the fields declared in dataclass ``cls``.

    A field statement is a line at the class body's indentation that starts ``name:``. Its description is the text
    of the comment-only lines right above it, of the comment(s) on its physical line(s), and of comment-only lines
    right below it whose text is indented ("#" then two or more spaces: a wrapped trailing comment), joined with
    spaces ("" when there is none).
    """
    first_line = inspect.getsourcelines(cls)[1]
    source = inspect.getsource(cls)
    lines = source.splitlines(keepends=True)
    # Dedent so that tokenize accepts a class nested in a function or indented in its module.
    indent = len(lines[0]) - len(lines[0].lstrip())
    source = "".join(line[indent:] if line[:indent].isspace() else line for line in lines)

    comments: dict[str, tuple[int, str]] = {}
    depth = 0  # INDENT depth: 1 = the class body
    statement: list[tokenize.TokenInfo] = []  # tokens of the current logical line
    last = None  # (name, column, last row) of the field statement just read, while comment lines may continue it
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type == tokenize.NL and not statement:
            last = None
            continue  # blank line between statements
        if tok.type == tokenize.NL and len(statement) == 1 and statement[0].type == tokenize.COMMENT:
            # a comment-only line: a wrapped comment of the field above it when it directly follows that field and
            # its text is indented ("#" and two or more spaces, aligned under the comment it continues); else it
            # stays in `statement`, to describe the field below it
            if last and tok.start[0] == last[2] + 1 and statement[0].string.startswith("#  "):
                line, text = comments[last[0]]
                comments[last[0]] = (line, f"{text} {statement[0].string.lstrip('#').strip()}".strip())
                last = (last[0], last[1], tok.start[0])
                statement = []
                continue
            last = None
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            code = [t for t in statement if t.type not in (tokenize.COMMENT, tokenize.NL)]
            last = None
            if depth == 1 and len(code) >= 2 and code[0].type == tokenize.NAME and code[1].string == ":":
                text = " ".join(t.string.lstrip("#").strip() for t in statement if t.type == tokenize.COMMENT)
                comments[code[0].string] = (first_line + code[0].start[0] - 1, text)
                last = (code[0].string, code[0].start[1], tok.start[0])
            statement = []
            continue
        statement.append(tok)
    return comments


# ----------------------------------------------------------------------------------------------------------------
# walking the schema


@dataclasses.dataclass
class Row:
    key: str  # dotted key as written in overrides, e.g. train.lr or curriculum.stages[i].mask_ratio
    type: str  # rendered type
    default: str  # rendered default
    description: str  # the field's comment


@dataclasses.dataclass
class Section:
    key: str  # "" for the top level
    cls: type  # the dataclass
    rows: list[Row]


def _dataclass_of(tp) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _list_item(tp):
    """The item type of List[X] / list[X], else None."""
    if typing.get_origin(tp) in (list, typing.List):
        (item,) = typing.get_args(tp) or (typing.Any,)
        return item
    return None


def _strip_optional(tp):
    """(X, True) for Optional[X], else (tp, False)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp, sections: dict[type, str]) -> str:
    tp, optional = _strip_optional(tp)
    item = _list_item(tp)
    if item is not None:
        name = f"list[{_type_name(item, sections)}]"
    elif _dataclass_of(tp) is not None:
        name = f"section `{sections[tp]}`" if tp in sections else tp.__name__
    elif isinstance(tp, type):
        name = tp.__name__
    else:
        name = str(tp).replace("typing.", "")
    return f"{name} or null" if optional else name


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return repr(value)


def _default(f: dataclasses.Field, sub_key: str | None):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return f"see `{sub_key}`"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        n = len(value)
        return f"{n} {'entry' if n == 1 else 'entries'} with the defaults of `{sub_key}`"
    return f"`{_yaml_scalar(value)}`"


def collect_sections(root: type | None = None) -> list[Section]:
    """Walk the dataclass tree from ``root`` (default: mardini's Config), depth first in field order.

    Raises MissingCommentError naming every field that has no trailing comment.
    """
    if root is None:
        from mardini.training.config import Config

        root = Config

    order: list[tuple[str, type]] = []  # (section key, class), parents before children

    def visit(key: str, cls: type) -> None:
        order.append((key, cls))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = _strip_optional(hints[f.name])
            sub = f"{key}.{f.name}" if key else f.name
            if _dataclass_of(tp) is not None:
                visit(sub, tp)
            elif _dataclass_of(_list_item(tp)) is not None:
                visit(f"{sub}[i]", _list_item(tp))

    visit("", root)
    sections_by_cls = {cls: key for key, cls in order if key}

    missing: list[str] = []
    sections: list[Section] = []
    for key, cls in order:
        comments = field_comments(cls)
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            full = f"{key}.{f.name}" if key else f.name
            qualname = f"{cls.__name__}.{f.name}"
            line, text = comments.get(f.name, (inspect.getsourcelines(cls)[1], ""))
            if text and qualname in PENDING_COMMENTS:
                print(f"warning: {qualname} now has a comment in its source; remove it from PENDING_COMMENTS in "
                      f"{Path(__file__).name}", file=sys.stderr)
            if not text:
                text = PENDING_COMMENTS.get(qualname, "")
                if text:
                    print(f"warning: {qualname} ({_module_path(cls)}:{line}) has no trailing comment; using "
                          f"PENDING_COMMENTS", file=sys.stderr)
            if not text:
                missing.append(f"{full}: {qualname} at {_module_path(cls)}:{line}")
                continue
            tp, _ = _strip_optional(hints[f.name])
            sub_key = full if _dataclass_of(tp) else f"{full}[i]" if _dataclass_of(_list_item(tp)) else None
            rows.append(Row(full, _type_name(hints[f.name], sections_by_cls), _default(f, sub_key), text))
        sections.append(Section(key, cls, rows))
    if missing:
        raise MissingCommentError("config fields without a trailing '# comment' (add one on the field's line):\n  "
                                  + "\n  ".join(missing))
    return sections


# ----------------------------------------------------------------------------------------------------------------
# rendering


def _cell(text: str, html: bool = True) -> str:
    """Escape for a table cell: pipes always; <, > and & in prose (so outputs/<experiment> is not eaten as HTML)."""
    if html:
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def _module_path(cls: type) -> str:
    path = Path(inspect.getsourcefile(cls)).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def render(root: type | None = None) -> str:
    """The full text of docs/CONFIG.md."""
    sections = collect_sections(root)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the schema dataclasses: do not edit by hand. -->",
        "<!-- Regenerate with `python scripts/config_reference.py`; tests fail while this file is stale. -->",
        "",
        "Every key of the run config, with the schema's type, default and description. The schema is the `Config`",
        "dataclass of `mardini/training/config.py`, registered with Hydra as `mardini_schema`: an unknown key or a",
        "value of the wrong type fails at composition, and `validate_config` checks values and cross-field rules",
        "before anything is built. The YAML files under `configs/` (groups `model/`, `diffusion/`, `curriculum/`,",
        "`autoencoder/`, `data/`, `train/` and the presets in `experiment/`) set these keys; the defaults below are",
        "the schema's, which a group file may change. Override any key on the command line:",
        "",
        "```",
        "mardini-train experiment=small_synthetic train.lr=1e-4 model.generator.depth=8",
        "mardini-train curriculum=interpolation curriculum.stages.0.mask_ratio=[0.2,0.8]",
        "```",
        "",
        "Print the composed config without running: `python -m mardini.train --cfg job`.",
        "",
        "## Sections",
        "",
    ]
    for s in sections:
        title = s.key or "top level"
        anchor = title.replace(".", "").replace("[", "").replace("]", "").replace(" ", "-")
        out.append(f"- [`{title}`](#{anchor})")
    for s in sections:
        title = s.key or "top level"
        out += ["", f"## {title}", "", f"`{s.cls.__name__}` in `{_module_path(s.cls)}`.", ""]
        if s.key.endswith("[i]"):
            out += ["One entry of a list; `i` is its index (`0` is the first).", ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for r in s.rows:
            out.append(f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default, html=False)} | {_cell(r.description)} |")
    return "\n".join(out) + "\n"


def check(path: Path = DOC_PATH) -> tuple[bool, str]:
    """(up to date, unified diff from the file on disk to the generated text)."""
    expected = render()
    current = path.read_text() if path.exists() else ""
    if current == expected:
        return True, ""
    diff = difflib.unified_diff(current.splitlines(keepends=True), expected.splitlines(keepends=True),
                                fromfile=f"{path} (on disk)", tofile=f"{path} (generated)")
    return False, "".join(diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if the file is stale")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="file to write or check")
    args = parser.parse_args(argv)
    try:
        if args.check:
            ok, diff = check(args.output)
            if not ok:
                sys.stdout.write(diff)
                print(f"\n{args.output} is stale: run `python scripts/config_reference.py`", file=sys.stderr)
                return 1
            print(f"{args.output} is up to date")
            return 0
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render())
        print(f"wrote {args.output}")
        return 0
    except MissingCommentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
