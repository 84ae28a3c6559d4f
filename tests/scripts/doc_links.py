#!/usr/bin/env python3
"""Checks the relative links of the repository's Markdown files (README.md, docs/*.md).

Every link that is not a URL must name a file or directory that exists, and its `#anchor`, if
any, a heading of the Markdown file it points to (anchors made as GitHub makes them: lower
case, punctuation dropped, spaces to hyphens, `-1`, `-2`… for repeats). Code blocks and code
spans are skipped. Prints every broken link and exits 1 if there is one.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def prose(text):
    """The text without code blocks and code spans, line breaks kept for line numbers."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    seen, out = {}, set()
    for title in HEADING.findall(text):
        slug = re.sub(r"[^\w\- ]", "", title.lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def markdown_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return sorted(p for p in listed if not p.startswith(("target/", ".tools/")))


def main():
    broken = []
    files = markdown_files()
    for rel in files:
        path = os.path.join(ROOT, rel)
        with open(path, encoding="utf-8") as f:
            text = prose(f.read())
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # a URL (https:, mailto:, …)
            line = text.count("\n", 0, m.start()) + 1
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(dest):
                broken.append(f"{rel}:{line}: {target}: no such file")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{rel}:{line}: {target}: no heading #{anchor}")
    for b in broken:
        print(b)
    if broken:
        sys.exit(1)
    print(f"doc links: {len(files)} Markdown files, every relative link resolves")


if __name__ == "__main__":
    main()
