"""The suite's own scheduling: tests that share an expensive module fixture (a SLURM cluster, the
FSDP runs, the Muon run, the spike-guard runs) are marked `xdist_group` so that one worker builds
it once. pytest-xdist's `--dist loadgroup` honours the mark by suffixing the node id with
`@<group>`; pytest 9.2 broke that silently (pytest-dev/pytest-xdist#1386) and every such fixture
was built on both workers, a minute and a half of CI. This fails if it happens again."""

import pytest


@pytest.mark.xdist_group("probe")
def test_xdist_group_marks_keep_a_group_on_one_worker(request):
    if getattr(request.config, "workerinput", None) is None:
        pytest.skip("not run by a pytest-xdist worker (-n 0): nothing is distributed")
    assert request.config.getvalue("loadgroup"), "pyproject.toml's addopts should hold --dist loadgroup"
    assert request.node.nodeid.endswith("@probe"), (
        f"{request.node.nodeid}: pytest-xdist ignored the xdist_group mark; pin a pytest it works with "
        "(pyproject.toml's dev group)"
    )
