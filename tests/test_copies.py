"""Marked copies between model files must stay identical to their origin (STYLE.md, "Copies").

A block (class or function, with its decorators) that also lives in another model file is preceded by a marker:

    # Copied from soundstream.py: ResidualVectorQuantizer
    # Copied from soundstream.py: Trainer.step with SoundStream->Encodec, soundstream->encodec

The origin is `<file>: <qualified name>` (`Class.method` for methods). Optional renames `old->new`, comma
separated, are applied to the origin's text (whole words only) before the comparison. The comparison is exact,
after removing the common indentation and trailing whitespace, so a copy edited without its origin (or the other
way round) fails here with a diff.
"""

import ast
import difflib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^\s*# Copied from (?P<file>[\w./-]+\.py): (?P<name>[\w.]+)(?: with (?P<renames>.+))?\s*$")


@dataclass
class Marker:
    path: Path      # the file holding the copy
    line: int       # 1-based line of the marker comment
    origin: str     # origin file, relative to the repository root
    name: str       # qualified name of the block in the origin
    renames: list   # [(old, new)]


def find_markers(path):
    markers = []
    for i, text in enumerate(Path(path).read_text().splitlines(), start=1):
        m = MARKER.match(text)
        if m:
            renames = []
            for pair in (m["renames"] or "").split(","):
                if pair.strip():
                    old, sep, new = pair.strip().partition("->")
                    if not sep or not old.strip() or not new.strip():
                        raise ValueError(f"{path}:{i}: bad rename {pair.strip()!r} (expected old->new)")
                    renames.append((old.strip(), new.strip()))
            markers.append(Marker(Path(path), i, m["file"], m["name"], renames))
    return markers


def _blocks(tree):
    """Every class/function node with its qualified name."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[name] = child
                walk(child, name + ".")

    walk(tree, "")
    return out


def _source(lines, node):
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    text = textwrap.dedent("\n".join(lines[start - 1:node.end_lineno]))
    return "\n".join(line.rstrip() for line in text.splitlines())


def _block_after(path, line):
    """The class/function that starts on the first non-blank, non-comment line after `line`."""
    lines = Path(path).read_text().splitlines()
    nxt = line + 1
    while nxt <= len(lines) and (not lines[nxt - 1].strip() or lines[nxt - 1].strip().startswith("#")):
        nxt += 1
    for node in _blocks(ast.parse("\n".join(lines))).values():
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if start == nxt:
            return _source(lines, node)
    return None


def check_marker(marker, root):
    """Returns a list of problems (empty when the copy matches its origin)."""
    where = f"{marker.path.name}:{marker.line}"
    copy = _block_after(marker.path, marker.line)
    if copy is None:
        return [f"{where}: the marker is not followed by a class or function"]
    origin_path = Path(root) / marker.origin
    if not origin_path.is_file():
        return [f"{where}: origin file {marker.origin} does not exist"]
    lines = origin_path.read_text().splitlines()
    node = _blocks(ast.parse("\n".join(lines))).get(marker.name)
    if node is None:
        return [f"{where}: {marker.origin} has no class or function {marker.name}"]
    expected = _source(lines, node)
    for old, new in marker.renames:
        expected = re.sub(rf"\b{re.escape(old)}\b", new, expected)
    if expected == copy:
        return []
    diff = "\n".join(difflib.unified_diff(expected.splitlines(), copy.splitlines(),
                                          f"{marker.origin}: {marker.name}", where, lineterm=""))
    return [f"{where}: copy differs from {marker.origin}: {marker.name}\n{diff}"]


def check_tree(root):
    problems = []
    for path in sorted(Path(root).glob("*.py")) + sorted(Path(root).glob("common/*.py")):
        for marker in find_markers(path):
            problems += check_marker(marker, root)
    return problems


# -----------------------------------------------------------------------------------------------------------------


def test_marked_copies_in_this_repository_match_their_origin():
    problems = check_tree(ROOT)
    assert not problems, "\n\n".join(problems)


ORIGIN = '''
import torch


def helper(x):
    return x * 2


class Block:
    """A block."""

    def forward(self, x):
        y = helper(x)  # a comment
        return y + 1
'''


def _write(tmp_path, copy_text):
    (tmp_path / "origin.py").write_text(ORIGIN)
    (tmp_path / "copy.py").write_text(copy_text)
    return check_tree(tmp_path)


def test_checker_accepts_an_identical_copy(tmp_path):
    copy = '''import torch


# Copied from origin.py: Block
class Block:
    """A block."""

    def forward(self, x):
        y = helper(x)  # a comment
        return y + 1
'''
    assert _write(tmp_path, copy) == []


def test_checker_rejects_an_edited_copy_with_a_diff(tmp_path):
    copy = '''# Copied from origin.py: Block
class Block:
    """A block."""

    def forward(self, x):
        y = helper(x)  # a comment
        return y + 2
'''
    problems = _write(tmp_path, copy)
    assert len(problems) == 1 and "differs" in problems[0] and "+        return y + 2" in problems[0]


def test_checker_applies_declared_renames_and_methods(tmp_path):
    copy = '''class Other:
    # Copied from origin.py: Block.forward with helper->twice
    def forward(self, x):
        y = twice(x)  # a comment
        return y + 1
'''
    assert _write(tmp_path, copy) == []
    # the same copy without the rename declared is a mismatch
    assert len(_write(tmp_path, copy.replace(" with helper->twice", ""))) == 1


def test_checker_reports_missing_origins_and_dangling_markers(tmp_path):
    assert "does not exist" in _write(tmp_path, "# Copied from nowhere.py: Block\ndef f():\n    pass\n")[0]
    assert "has no class or function" in _write(tmp_path, "# Copied from origin.py: Nope\ndef f():\n    pass\n")[0]
    assert "not followed" in _write(tmp_path, "x = 1\n# Copied from origin.py: Block\nx = 2\n")[0]
    with pytest.raises(ValueError, match="bad rename"):
        _write(tmp_path, "# Copied from origin.py: helper with a=b\ndef helper(x):\n    return x * 2\n")


# The generic training infrastructure of the codec template (DESIGN.md, "Templates"): the blocks
# the other codec files carry as verbatim marked copies. They must not name their model.
TEMPLATE_BLOCKS = {"soundstream.py": [
    "is_distributed", "setup_distributed", "busy_cores", "pick_threads", "rng_state",
    "set_rng_state", "atomic_save", "load_checkpoint", "config_from_dict", "batches_for_epoch",
    "log_line", "fit", "save_checkpoint", "evaluate", "bitrate_ladder", "field_help",
    "Parser", "parse_bool", "eval_utterances", "configs_from_args"],
    # the LM template's generic parts (issue 15): audiolm.py and audiogen.py carry them
    "valle.py": ["prefix_lm_mask", "Attention", "AdaptiveLayerNorm", "Block", "sinusoids",
                 "check_sampling", "filter_logits", "sample"]}


@pytest.mark.parametrize("origin", sorted(TEMPLATE_BLOCKS))
def test_template_blocks_hold_no_model_name(origin):
    lines = (ROOT / origin).read_text().splitlines()
    blocks = _blocks(ast.parse("\n".join(lines)))
    model = Path(origin).stem
    for name in TEMPLATE_BLOCKS[origin]:
        assert name in blocks, f"{origin} has no {name}"
        text = _source(lines, blocks[name])
        assert model not in text.lower(), f"{origin}: {name} names {model!r}; use NAME instead"
