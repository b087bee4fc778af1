#!/usr/bin/env python3
"""Generate the metric list of docs/metrics.md from the metric macros under src/.

Scans src/**/*.rs for `counter!(`, `gauge!(`, `histogram!(` and `describe_counter!(` /
`describe_gauge!(` / `describe_histogram!(` whose first argument is a string literal or a
`const NAME: &str = "..."` defined under src/. The columns metric, type, labels and where are
generated (labels: the label keys of the calls, with the values that are string literals);
the meaning column is hand-written and kept. Only the text between

    <!-- BEGIN GENERATED: metrics -->
    <!-- END GENERATED: metrics -->

is rewritten.

    scripts/gen-metrics-doc.py            rewrite the table (new metrics get a TODO meaning,
                                          or the code's describe_* text)
    scripts/gen-metrics-doc.py --check    exit 1, naming them, if metrics are missing from or
                                          extra in the table, a meaning is a TODO, or the
                                          generated columns are stale (nothing written)
    scripts/gen-metrics-doc.py --json     print the scan as JSON (nothing written): metric ->
                                          {"type", "labels": {key: {"values", "dynamic"}}};
                                          tests/deploy.rs checks the dashboards and alert
                                          rules in deploy/ against it

Python 3.11+ standard library only.
"""

import argparse
import difflib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN GENERATED: metrics -->"
END = "<!-- END GENERATED: metrics -->"
TODO = "TODO: describe"

STRING = r'"((?:[^"\\]|\\.)*)"'
MACRO_RE = re.compile(r"\b(describe_)?(counter|gauge|histogram)!\s*\(")
CONST_RE = re.compile(r"\bconst\s+([A-Za-z_][A-Za-z0-9_]*)\s*:\s*&(?:'static\s+)?str\s*=\s*" + STRING)
LABEL_RE = re.compile(STRING + r"\s*=>\s*(?:" + STRING + r")?")


def code_of(path):
    """Source with `//` comment lines blanked (doc comments may mention the macros)."""
    return "\n".join("" if l.lstrip().startswith("//") else l for l in path.read_text().splitlines())


def call_args(code, start):
    """The text between the macro's `(` (at start - 1) and its matching `)`."""
    depth, i, quote = 1, start, False
    while i < len(code) and depth:
        c = code[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        i += 1
    return code[start : i - 1]


def scan(src):
    files = sorted(src.rglob("*.rs"))
    sources = [(p.relative_to(ROOT).as_posix(), code_of(p)) for p in files]
    consts = {}
    for _, code in sources:
        for m in CONST_RE.finditer(code):
            consts[m.group(1)] = m.group(2)
    metrics = {}
    unresolved = []
    for rel, code in sources:
        for m in MACRO_RE.finditer(code):
            args = call_args(code, m.end())
            line = code.count("\n", 0, m.start()) + 1
            first = args.lstrip()
            lit = re.match(STRING, first)
            if lit:
                name = lit.group(1)
            else:
                ident = re.match(r"[A-Za-z_][A-Za-z0-9_:]*", first)
                name = consts.get(ident.group(0).split("::")[-1]) if ident else None
                if name is None:
                    unresolved.append(f"{rel}:{line}")
                    continue
            kind = m.group(2)
            entry = metrics.setdefault(
                name, {"types": set(), "labels": defaultdict(set), "where": set(), "describe": None}
            )
            entry["types"].add(kind)
            entry["where"].add(area_of(rel))
            if m.group(1):
                desc = re.findall(STRING, first[lit.end() if lit else len(ident.group(0)) :])
                if desc:
                    entry["describe"] = desc[-1]
            else:
                for lm in LABEL_RE.finditer(args):
                    values = entry["labels"][lm.group(1)]
                    # None stands for a value computed at run time.
                    values.add(lm.group(2))
    for name, e in metrics.items():
        if len(e["types"]) > 1:
            raise SystemExit(f"metric {name} is registered as several types: {sorted(e['types'])}")
    return metrics, unresolved


def area_of(rel):
    parts = rel.split("/")
    if len(parts) > 2:
        return parts[1] if parts[1] != "bin" else "/".join(parts[1:])
    return parts[-1]


def as_json(metrics):
    """The scan as plain data: label values that are literals in the code, and whether some
    value is computed at run time (then any value may appear)."""
    return {
        name: {
            "type": next(iter(e["types"])),
            "labels": {
                key: {
                    "values": sorted(v for v in values if v is not None),
                    "dynamic": None in values,
                }
                for key, values in e["labels"].items()
            },
        }
        for name, e in metrics.items()
    }


def split_row(line):
    cells, cur, i = [], "", 0
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cur += "\\|"
            i += 2
            continue
        if body[i] == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += body[i]
        i += 1
    cells.append(cur.strip())
    return cells


def existing_rows(block):
    """metric name -> hand-written meaning, from the current table."""
    rows = {}
    for line in block.splitlines():
        if not line.startswith("| `"):
            continue
        cells = split_row(line)
        name = cells[0].strip("`")
        rows[name] = cells[-1]
    return rows


def labels_cell(labels):
    parts = []
    for key in sorted(labels):
        literal = sorted(v for v in labels[key] if v is not None)
        shown = [f"`{v}`" for v in literal] + (["…"] if None in labels[key] else [])
        parts.append(f"`{key}`" + (f" ({', '.join(shown)})" if literal else ""))
    return ", ".join(parts)


def render(metrics, meanings):
    out = [
        "<!-- Generated by scripts/gen-metrics-doc.py from the metric macros under src/; the meaning"
        " column is hand-written and kept. Run `make docs` after adding a metric. -->",
        "",
        "| metric | type | labels | where | meaning |",
        "|---|---|---|---|---|",
    ]
    order = sorted(metrics, key=lambda n: (sorted(metrics[n]["where"])[0], n))
    for name in order:
        e = metrics[name]
        meaning = meanings.get(name) or (e["describe"] and e["describe"].replace("|", "\\|")) or TODO
        out.append(
            f"| `{name}` | {next(iter(e['types']))} | {labels_cell(e['labels'])} | "
            f"{', '.join(sorted(e['where']))} | {meaning} |"
        )
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    ap.add_argument("--json", action="store_true", help="print the registered metrics as JSON")
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "metrics.md")
    args = ap.parse_args()
    if args.doc.resolve().is_relative_to(ROOT):
        args.doc = args.doc.resolve().relative_to(ROOT)
    doc = (ROOT / args.doc).read_text()
    try:
        head, rest = doc.split(BEGIN, 1)
        block, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"{args.doc}: markers {BEGIN} / {END} not found")
    metrics, unresolved = scan(args.src)
    if unresolved:
        print(
            "metric macros whose name is neither a string literal nor a `const …: &str` under src/: "
            + ", ".join(unresolved),
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(as_json(metrics), indent=2, sort_keys=True))
        return 0
    meanings = existing_rows(block)
    missing = sorted(set(metrics) - set(meanings))
    extra = sorted(set(meanings) - set(metrics))
    new = f"{head}{BEGIN}\n{render(metrics, meanings)}{END}{tail}"
    if args.check:
        problems = []
        if missing:
            problems.append("registered in src/ but missing from the table: " + ", ".join(missing))
        if extra:
            problems.append("in the table but not registered in src/: " + ", ".join(extra))
        todo = sorted(n for n, m in meanings.items() if n in metrics and (not m or m == TODO))
        if todo:
            problems.append("no meaning written yet: " + ", ".join(todo))
        if not problems and new != doc:
            diff = difflib.unified_diff(
                doc.splitlines(), new.splitlines(), str(args.doc), "generated", lineterm="", n=0
            )
            print("\n".join(diff))
            problems.append("generated columns (type, labels, where) are stale")
        if problems:
            for p in problems:
                print(f"{args.doc}: {p}", file=sys.stderr)
            print("run `make docs` (scripts/gen-metrics-doc.py), then write the meanings", file=sys.stderr)
            return 1
        print(f"{args.doc}: metric table up to date ({len(metrics)} metrics)")
        return 0
    for name in missing:
        print(f"added {name}: write its meaning in {args.doc}")
    for name in extra:
        print(f"removed {name}: no longer registered under src/")
    if new != doc:
        (ROOT / args.doc).write_text(new)
        print(f"{args.doc}: metric table rewritten ({len(metrics)} metrics)")
    else:
        print(f"{args.doc}: metric table already up to date ({len(metrics)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
