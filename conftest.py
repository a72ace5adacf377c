"""Repository-wide pytest set-up: offline Hugging Face, the docs' code blocks as tests, the gpu marker.

At the root, not in tests/, so that it also applies when only README.md or a docs page is collected
(``pytest docs/zo.md``); tests/conftest.py holds what only the tests under tests/ use.
"""

import os

# Nothing may download at run time: the models come from installed packages (see lightning_bpfree.models).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # One plugin object keeps the snippets' fixtures, hooks and state together; each hook leaves every
    # item that is not a snippet alone (is_snippet), so the tests under tests/ see none of it.
    if not config.pluginmanager.has_plugin(DocsSnippets.name):
        config.pluginmanager.register(DocsSnippets(), DocsSnippets.name)


@dataclass
class _Chain:
    """What a block that passed leaves for the ``continuation`` block after it."""

    path: Path
    source: str  # the code the block stands for: its page's previous blocks (when it continues them) and its own
    namespace: dict[str, Any]
    folder: str
    rng: tuple[Any, Any, Any]  # torch, random, numpy states


class DocsSnippets:
    """The ```python blocks of README.md and docs/*.md as tests.

    pytest-markdown-docs (``--markdown-docs`` in pyproject's addopts, README.md and docs in its testpaths)
    finds the blocks and makes each one a test. Fence options are written in pymdownx.superfences' brace
    syntax, which mkdocs still highlights as Python:

    - ``{.python continuation}`` continues the page's previous block: it sees the names that block defined.
      Right after that block passed, it runs in the namespace, working directory and random state the
      block left, as the next cell of a notebook would; otherwise (selected alone with ``-k``, or after
      a failure) it runs the previous blocks' code first, as pytest-markdown-docs does. Both give the
      same result; the first does not pay for the previous blocks again.
    - ``{.python fixture:slow}`` marks a block that loads a real model or real data, or runs long: it gets
      the ``slow`` marker, so ``make test-slow`` runs it and ``make test`` deselects it;
    - ``{.python fixture:gpu}`` marks a block that needs CUDA: the ``gpu`` marker, skipped with the reason
      where there is none;
    - ``{.python fixture:script}`` runs the block as ``python snippet.py`` in a new process, its
      ``if __name__ == "__main__":`` part included: for a complete script that starts processes of its
      own (Lightning's launcher runs the script again for each further rank, which it cannot do for a
      block run inside pytest). Its output shows in the test's report; line numbers in a traceback are
      the page's.

    No block is left out silently (``notest`` is not used). Each block starts in an empty temporary working
    directory, from torch seed 0 on one intra-op thread (as the tests do), with ``HF_HUB_OFFLINE=1``, and
    with its output captured like any test's.
    """

    name = "bpfree-docs-snippets"
    markers = ("slow", "gpu")  # fence options that are markers too

    def __init__(self) -> None:
        self._chain: _Chain | None = None

    @staticmethod
    def is_snippet(item: pytest.Item) -> bool:
        return item.get_closest_marker("markdown-docs") is not None and hasattr(item, "test_definition")

    @pytest.fixture
    def slow(self) -> None:
        """Fence option ``fixture:slow``: the block gets the ``slow`` marker."""

    @pytest.fixture
    def gpu(self) -> None:
        """Fence option ``fixture:gpu``: the block gets the ``gpu`` marker."""

    @pytest.fixture
    def script(self) -> None:
        """Fence option ``fixture:script``: the block runs as a script in a new process."""

    @pytest.fixture(autouse=True)
    def _snippet_environment(self, request: pytest.FixtureRequest):
        if not self.is_snippet(request.node):
            yield
            return
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
        threads = torch.get_num_threads()
        torch.manual_seed(0)
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
        # A block that fails between init_process_group and its own clean-up must not leave the default
        # group to the tests after it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m and the gpu hook below skips
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Each block gets the markers named by its own ``fixture:`` options and by those of the blocks it
        continues: run alone it runs them first, and in a run it uses what they built, so it is as slow,
        or as CUDA-bound, as they are. Each block is run by :meth:`run_block`."""
        previous, inherited = None, set()
        for item in filter(self.is_snippet, items):
            source = item.test_definition.source
            continues = previous is not None and previous.strip() != "" and source.startswith(previous)
            names = {name for name in item.test_definition.fixture_names if name in self.markers}
            inherited = (inherited if continues else set()) | names
            for name in sorted(inherited):
                item.add_marker(name)
            previous = source
            item.runtest = functools.partial(self.run_block, item)

    def run_block(self, item: pytest.Item) -> None:
        """Run one block (in place of the plugin's ``runtest``, whose failure report is kept).

        Unlike the plugin's, it leaves pytest's output capture on: a failing block's output shows in its
        report, ``-s`` still shows it live, and ``make test`` does not print every Trainer's banner.
        """
        definition = item.test_definition
        # The plugin's item sets up only the fixtures its fence names; the rest of the closure (the
        # autouse ones: this plugin's environment, tmp_path, monkeypatch) is requested here, as its
        # own runtest does.
        for name in item._fixtureinfo.names_closure:
            item.fixture_request.getfixturevalue(name)
        chain, self._chain = self._chain, None  # dropped now: a block that fails leaves nothing to continue
        if "script" in definition.fixture_names:
            del chain
            self.run_script(definition.source)
            return
        if chain is not None and chain.path == definition.source_path and definition.source.startswith(chain.source):
            namespace = chain.namespace
            # the previous blocks' lines blanked, so that line numbers still point into the page
            code = "\n" * chain.source.count("\n") + definition.source[len(chain.source) :]
            os.chdir(chain.folder)  # the fixture's monkeypatch still restores the original directory
            torch.set_rng_state(chain.rng[0])
            random.setstate(chain.rng[1])
            np.random.set_state(chain.rng[2])
        else:
            del chain  # frees the previous page's models before this block builds its own
            namespace = types.ModuleType("fence").__dict__
            for extra in item.config.hook.pytest_markdown_docs_globals():
                namespace.update(extra)
            code = definition.source
        exec(compile(code, str(definition.source_path), "exec", dont_inherit=True), namespace)
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        self._chain = _Chain(definition.source_path, definition.source, namespace, os.getcwd(), rng)

    @staticmethod
    def run_script(source: str) -> None:
        """``python snippet.py`` in the block's directory, under the test's environment (offline)."""
        Path("snippet.py").write_text(source)  # the page's line numbers: the source starts with blank lines
        result = subprocess.run([sys.executable, "snippet.py"], capture_output=True, text=True, timeout=900)
        sys.stdout.write(result.stdout)  # into pytest's capture, shown in the report
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            raise AssertionError(f"the block, run as a script, exited with {result.returncode}:\n{result.stderr[-3000:]}")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` compare CPU with CUDA: skipped only where no CUDA device exists, run wherever
    one does (``make test``'s ``-m 'not slow'`` keeps them, as they are fast)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
