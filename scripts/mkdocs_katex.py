"""MkDocs hook: math rendered to HTML by KaTeX when the site is built, so pages need no network.

``pymdownx.arithmatex`` (generic mode) marks ``$...$`` as ``<span class="arithmatex">\\(...\\)</span>``
and ``$$...$$`` as ``<div class="arithmatex">\\[...\\]</div>``. This hook sends every formula of a
page to ``scripts/katex-render.js`` (one Node.js process per page) and puts KaTeX's HTML in their
place; the KaTeX stylesheet and fonts are copied from ``node_modules/katex`` into the site. A
formula KaTeX cannot parse, or a missing ``node_modules`` (run ``npm ci``), fails the build.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KATEX_DIST = ROOT / "node_modules" / "katex" / "dist"
RENDERER = ROOT / "scripts" / "katex-render.js"
SITE_FOLDER = "assets/katex"

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<display>.*?)\\\])\s*</(?P=tag)>',
    re.DOTALL,
)


def _check_katex() -> None:
    if not (KATEX_DIST / "katex.min.css").is_file():
        raise RuntimeError(f"KaTeX is not installed in {KATEX_DIST.parent}: run `npm ci` in {ROOT} (make docs does)")


def on_config(config):
    _check_katex()
    config["extra_css"].append(f"{SITE_FOLDER}/katex.min.css")
    return config


def on_page_content(page_html: str, page, config, files) -> str:
    matches = list(_MATH.finditer(page_html))
    if not matches:
        return page_html
    formulas = [
        [html.unescape(m["inline"] if m["inline"] is not None else m["display"]).strip(), m["display"] is not None]
        for m in matches
    ]
    result = subprocess.run(
        ["node", str(RENDERER)], input=json.dumps(formulas), capture_output=True, text=True, cwd=ROOT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"KaTeX failed on {page.file.src_path}:\n{result.stderr}")
    rendered = iter(json.loads(result.stdout))
    return _MATH.sub(lambda m: next(rendered), page_html)


def on_post_build(config) -> None:
    target = Path(config["site_dir"]) / SITE_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(KATEX_DIST / "katex.min.css", target / "katex.min.css")
    shutil.copytree(KATEX_DIST / "fonts", target / "fonts", dirs_exist_ok=True)
