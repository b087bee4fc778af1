#!/usr/bin/env python3
"""The import graph of src/: which file uses which, checked against the declared layers.

Usage:
  scripts/layers.py check             exit 1 on an import cycle between files or an upward import
  scripts/layers.py picture           the layers and what each module uses, as text
  scripts/layers.py check-docs FILE   exit 1 when FILE's generated picture differs from `picture`
  scripts/layers.py write-docs FILE   rewrite FILE's generated picture
  scripts/layers.py dot               the file graph in Graphviz form (`| dot -Tsvg > layers.svg`)
  scripts/layers.py text              one line per file: its layer and what it imports

Layers are declared in LAYERS below (lowest first); docs/architecture.md explains them.
A file may import its own layer or lower ones; within an area its files import each other
without cycles. `pub use` re-exports are followed to the file that defines the item, so a
parent `mod.rs` that only re-exports does not create a cycle with its children.

Written by hand (not `cargo modules`) because it needs no build and no extra install, and the
rule it checks is ours: a layer table, not the compiler's module tree.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Lowest first. A top-level module (or file) of src/ belongs to exactly one layer.
LAYERS = [
    ("foundation", ["config", "redact"]),
    ("infrastructure", ["infra", "app"]),
    ("transport", ["queue"]),
    ("domain", ["ledger", "chain"]),
    ("derived", ["snapshots", "access", "whitelist"]),
    ("operations", ["maintenance"]),
    ("composition", ["worker", "cli", "lib", "main"]),
]
LAYER_OF = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}

ITEM_RE = re.compile(
    r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:unsafe\s+)?"
    r"(?:struct|enum|fn|trait|type|const|static|mod|union|macro_rules!)\s+([A-Za-z_][A-Za-z0-9_]*)",
    re.M,
)


def files():
    out = {}
    for dirpath, _, names in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        if rel.split(os.sep)[0] == "bin":
            continue
        for n in names:
            if not n.endswith(".rs"):
                continue
            parts = [] if rel == "." else rel.split(os.sep)
            stem = n[:-3]
            if stem not in ("mod", "lib", "main"):
                parts = parts + [stem]
            elif stem in ("lib", "main") and not parts:
                parts = []
            key = "::".join(parts) if parts else ("lib" if n == "lib.rs" else "main")
            if n == "main.rs" and not parts:
                continue  # the binary uses the library from outside
            out[key] = os.path.join(dirpath, n)
    return out


def strip_comments(src):
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def test_free(src):
    """Drops `#[cfg(test)]` modules: tests may import anything."""
    i = src.find("#[cfg(test)]")
    return src if i < 0 else src[:i]


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = re.sub(r"\s+", "", tree)
    out = []

    def rec(prefix, t):
        if "{" not in t:
            for part in split_top(t):
                p = part.split(" as ")[0]
                if p == "self":
                    out.append(prefix.rstrip(":"))
                elif p:
                    out.append(prefix + p)
            return
        for part in split_top(t):
            if "{" in part:
                head, rest = part.split("{", 1)
                rec(prefix + head, rest[:-1])
            else:
                rec(prefix, part)

    def split_top(t):
        depth, cur, parts = 0, "", []
        for ch in t:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        return parts

    rec("", tree)
    return out


def module_of(key):
    return key.split("::") if key not in ("lib",) else []


def prefix_of(base):
    return "::".join(base) + "::" if base else ""


def resolve(path, here, mods):
    """An absolute `crate::…` path for a relative one, or None for external crates."""
    segs = path.split("::")
    base = module_of(here)
    if here in mods and not mods[here].endswith(("mod.rs", "lib.rs")):
        parent = base[:-1]
    else:
        parent = base
    if segs[0] == "crate":
        return segs[1:]
    if segs[0] == "self":
        return (base if mods[here].endswith(("mod.rs", "lib.rs")) else base) + segs[1:]
    children = {c.split("::")[-1] for c in mods if c.startswith(prefix_of(base)) and c.count("::") == len(base)}
    if segs[0] in children and mods[here].endswith(("mod.rs", "lib.rs")):
        return base + segs
    if segs[0] == "super":
        cur = base if not mods[here].endswith(("mod.rs", "lib.rs")) else base
        cur = cur[:-1]
        segs = segs[1:]
        while segs and segs[0] == "super":
            cur = cur[:-1]
            segs = segs[1:]
        return cur + segs
    return None


BEGIN = "<!-- BEGIN GENERATED: layers (scripts/layers.py picture) -->"
END = "<!-- END GENERATED: layers -->"


def picture(mods, edges, top):
    """Highest layer first: each layer's modules and the other modules each one uses."""
    lines = []
    for i in range(len(LAYERS) - 1, -1, -1):
        name, ms = LAYERS[i]
        present = [m for m in ms if any(top(k) == m for k in mods) and m != "lib"]
        if not present:
            continue
        lines.append(f"{i} {name}")
        for m in present:
            uses = sorted({top(t) for k in mods if top(k) == m for t in edges.get(k, ()) if top(t) != m})
            lines.append(f"    {m:<12} -> {', '.join(uses) if uses else '(nothing)'}")
    return "\n".join(lines)


def main():
    mods = files()
    texts = {k: test_free(strip_comments(open(p).read())) for k, p in mods.items()}
    defined = {k: set(ITEM_RE.findall(t)) for k, t in texts.items()}
    reexports = {}  # (file, name) -> absolute path
    raw_uses = {}
    for k, t in texts.items():
        uses = []
        for m in re.finditer(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", t):
            for p in expand_use(m.group(2)):
                absd = resolve(p, k, mods)
                if absd is None:
                    continue
                if m.group(1):
                    reexports[(k, p.split("::")[-1].split(" as ")[-1])] = absd
                else:
                    uses.append(absd)
        base = module_of(k)
        kids = [c.split("::")[-1] for c in mods if c.startswith(prefix_of(base)) and c.count("::") == len(base)]
        heads = "crate|super" + ("|" + "|".join(kids) if kids and mods[k].endswith(("mod.rs", "lib.rs")) else "")
        body = re.sub(r"\b(pub(?:\([^)]*\))?\s+)?use\s+[^;]+;", "", t)
        for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:" + heads + r")(?:::[A-Za-z_][A-Za-z0-9_]*)+)", body):
            absd = resolve(m.group(1), k, mods)
            if absd:
                uses.append(absd)
        raw_uses[k] = uses

    def target(absd, depth=0):
        """The file that defines the item at `absd`."""
        for n in range(len(absd), 0, -1):
            key = "::".join(absd[:n])
            if key in mods:
                rest = absd[n:]
                if rest and depth < 10 and (key, rest[0]) in reexports and rest[0] not in defined[key]:
                    return target(reexports[(key, rest[0])] + rest[1:], depth + 1)
                if rest and rest[0] in [c.split("::")[-1] for c in mods if c.startswith(key + "::") and c.count("::") == key.count("::") + 1]:
                    return target(absd[: n + 1] + rest[1:], depth + 1) if "::".join(absd[: n + 1]) in mods else key
                return key
        return "lib"

    # A file that names an item it re-exports (`pub use child::X;` then `X` in its own code)
    # uses the file that defines X.
    for (k, name), absd in reexports.items():
        body = re.sub(r"\b(pub(?:\([^)]*\))?\s+)?use\s+[^;]+;", "", texts[k])
        if re.search(r"(?<![A-Za-z0-9_:])" + re.escape(name) + r"\b", body):
            raw_uses[k].append(absd)

    edges = {}
    for k, uses in raw_uses.items():
        ts = set()
        for u in uses:
            t = target(u)
            if t != k:
                ts.add(t)
        edges[k] = ts

    def top(k):
        return k.split("::")[0]

    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd in ("picture", "check-docs", "write-docs"):
        pic = picture(mods, edges, top)
        if cmd == "picture":
            print(pic)
            return 0
        path = sys.argv[2]
        text = open(path).read()
        i, j = text.find(BEGIN), text.find(END)
        if i < 0 or j < 0:
            print(f"{path}: no generated picture block ({BEGIN} … {END})")
            return 1
        block = BEGIN + "\n```\n" + pic + "\n```\n" + END
        if cmd == "write-docs":
            open(path, "w").write(text[:i] + block + text[j + len(END):])
            return 0
        if text[i:j + len(END)] != block:
            print(f"{path}: the layer picture is stale; run scripts/layers.py write-docs {path}")
            return 1
        return 0
    if cmd == "dot":
        print("digraph tokenwarden {\n  rankdir=BT; node [shape=box, fontname=monospace];")
        for i, (name, ms) in enumerate(LAYERS):
            print(f'  subgraph cluster_{i} {{ label="{i} {name}";')
            for k in sorted(mods):
                if top(k) in ms:
                    print(f'    "{k}";')
            print("  }")
        for k in sorted(edges):
            for t in sorted(edges[k]):
                print(f'  "{k}" -> "{t}";')
        print("}")
        return 0
    if cmd == "text":
        for k in sorted(edges):
            print(f"{k} [{LAYER_OF.get(top(k), '?')}] -> {', '.join(sorted(edges[k]))}")
        return 0

    problems = []
    for k in mods:
        if top(k) not in LAYER_OF:
            problems.append(f"{mods[k]}: module `{top(k)}` has no layer in scripts/layers.py")
    for k, ts in edges.items():
        for t in ts:
            lk, lt = LAYER_OF.get(top(k), -1), LAYER_OF.get(top(t), -1)
            if top(k) == "lib" or top(t) == "lib":
                continue
            if lt > lk:
                problems.append(
                    f"upward import: {k} ({LAYERS[lk][0]}) uses {t} ({LAYERS[lt][0]})")
    # cycles (Tarjan)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index and v != "lib":
            strong(v)
    for comp in sccs:
        if "lib" in comp:
            continue
        problems.append("import cycle: " + " -> ".join(comp))
    for p in sorted(problems):
        print(p)
    if problems:
        print(f"{len(problems)} layer problem(s); see docs/architecture.md", file=sys.stderr)
        return 1
    print(f"layers ok: {len(mods)} files, {sum(len(v) for v in edges.values())} imports, no cycle, no upward import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
