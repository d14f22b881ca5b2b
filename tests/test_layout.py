"""gridx.py's layout, held against its map (the comment block at its top).

The map lists every banner section in order; a library section (everything
above the first "Commands" banner) uses only names defined in itself or in a
section above it, and never a cmd_* handler; the handlers stand in the order
COMMANDS lists them, each with a docstring; the argument builders live in the
Argument parser section; imports follow the map's rule.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gridx

SOURCE = Path(gridx.__file__).read_text()
LINES = SOURCE.splitlines()
TREE = ast.parse(SOURCE)
RULE = re.compile(r"^# -{20,}$")


def banners():
    """[(line number, title)] of the three-line banners."""
    return [(i + 2, LINES[i + 1][2:].strip()) for i in range(len(LINES) - 2)
            if RULE.match(LINES[i]) and RULE.match(LINES[i + 2]) and LINES[i + 1].startswith("# ")]


def map_titles():
    """The section titles the map lists, in its order."""
    start = LINES.index("# Map: the sections below, in order; each uses only what stands above it")
    titles = []
    for line in LINES[start + 2:]:
        if line == "#":
            break
        titles.append(re.split(r"\s{2,}", line[4:].strip())[0])
    return titles


def section_of(lineno, found=None):
    title = None
    for start, name in found or banners():
        if start <= lineno:
            title = name
    return title


def top_level_definitions():
    """{name: (node, section title)} for every module-level def, class and assignment."""
    found = banners()
    names = {}
    for node in TREE.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    targets.append(target.id)
                elif isinstance(target, ast.Tuple):
                    targets += [element.id for element in target.elts]
        for name in targets:
            names.setdefault(name, (node, section_of(node.lineno, found)))
    return names


def test_the_map_lists_every_banner_in_order():
    assert map_titles() == [title for _, title in banners()]


def test_the_map_names_the_module_state_of_each_way_a_command_runs():
    top = "\n".join(LINES[:LINES.index("import os")])
    for state in ("DOCKER_HOST", "OWNER", "SERVE_LIMITS", "INVOCATION", "COMMANDS"):
        assert state in top and hasattr(gridx, state)


def test_library_sections_use_only_what_stands_above_them():
    titles = [title for _, title in banners()]
    order = {title: index for index, title in enumerate(titles)}
    first_command = min(order[title] for title in titles if title.startswith("Commands"))
    definitions = top_level_definitions()
    upward = []
    for name, (node, section) in definitions.items():
        if order[section] >= first_command:
            continue
        for used in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
            if used in definitions and order[definitions[used][1]] > order[section]:
                upward.append(f"{section}: {name} uses {used} ({definitions[used][1]})")
    assert upward == []


def test_no_library_function_names_a_handler():
    definitions = top_level_definitions()
    for name, (node, section) in definitions.items():
        if section.startswith("Commands") or section in ("Argument parser", "Main"):
            continue
        named = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id.startswith("cmd_")}
        assert not named, f"{name} ({section}) names {named}"


def handlers_in_commands_order():
    order = []
    for _, _, commands in gridx.COMMANDS.values():
        order += [handler.__name__ for handler, *_ in commands.values()]
    order.append(gridx.CLUSTER_SHORTCUT[0].__name__)
    return list(dict.fromkeys(order + ["cmd_serve"]))


def test_handlers_stand_in_the_order_commands_lists_them():
    in_file = [node.name for node in TREE.body if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_")]
    assert in_file == handlers_in_commands_order()


def test_every_handler_has_a_docstring_and_lives_in_a_commands_section():
    definitions = top_level_definitions()
    for name in handlers_in_commands_order():
        node, section = definitions[name]
        assert ast.get_docstring(node), f"{name} has no docstring"
        assert section.startswith("Commands"), f"{name} is in {section}"


def is_argument_builder(name, node):
    """args_* (one per command), and add_* helpers that take the parser."""
    if not isinstance(node, ast.FunctionDef):
        return False
    first = node.args.args[0].arg if node.args.args else None
    return name.startswith("args_") or (name.startswith("add_") and first in ("p", "parser", "groups"))


def test_argument_builders_live_in_the_parser_section():
    definitions = top_level_definitions()
    builders = {name: section for name, (node, section) in definitions.items() if is_argument_builder(name, node)}
    assert builders and set(builders.values()) == {"Argument parser"}, builders


@pytest.fixture(scope="module")
def loaded_anyway():
    """The modules Python and argparse load before gridx's own code runs."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys, argparse; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_top_level_imports_are_modules_loaded_anyway(loaded_anyway):
    top = {alias.name for node in TREE.body if isinstance(node, ast.Import) for alias in node.names}
    assert top and top <= loaded_anyway, top - loaded_anyway


def test_function_imports_only_of_modules_that_cost_start_up(loaded_anyway):
    local = set()
    for function in ast.walk(TREE):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    local |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    local.add(node.module)
    assert local and not (local & loaded_anyway), local & loaded_anyway
