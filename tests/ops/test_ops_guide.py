"""docs/operations.md against the code: every variable the guide names exists, every setting of the code is in the
guide's table (derived from ``Settings.model_fields``, so a new setting fails this test until it has a row), the
stack variables are the ones docker/compose.yaml interpolates, and the metrics it lists are the ones /metrics
exposes."""

from __future__ import annotations

import re

import opsutil
import pytest
from opsutil import COMPOSE, GUIDE, REPO

pytest.importorskip("pydantic_settings")


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text()


def _diff_message(what: str, code: set[str], doc: set[str], where: str) -> str:
    parts = []
    if code - doc:
        parts.append(f"in the code but not in {where}: {sorted(code - doc)} (add a row each)")
    if doc - code:
        parts.append(f"in {where} but not in the code: {sorted(doc - code)} (remove or fix the row)")
    return f"{what}: " + "; ".join(parts)


def test_settings_table_matches_the_settings_code(guide) -> None:
    rows = opsutil.guide_table(guide, "settings")
    assert len(rows) == len(set(rows)), f"rows named twice: {sorted({r for r in rows if rows.count(r) > 1})}"
    code = set(opsutil.settings_env_names())
    assert set(rows) == code, _diff_message("service settings", code, set(rows), "docs/operations.md's settings table")


def test_library_table_matches_the_variables_the_library_reads(guide) -> None:
    rows = opsutil.guide_table(guide, "library-env")
    code = opsutil.library_env_names()
    assert {"VOXELDOSE_DEVICE", "VOXELDOSE_KERNEL_DIR", "VOXELDOSE_KERNEL_CACHE"} <= code  # the scan finds them
    assert set(rows) == code, _diff_message("library variables", code, set(rows), "the library-env table")


def test_every_variable_the_guide_names_exists(guide) -> None:
    named = set(opsutil.VAR_NAME.findall(guide))
    unknown = named - opsutil.known_env_names()
    assert not unknown, f"docs/operations.md names VOXELDOSE_* variables no code reads: {sorted(unknown)}"


def test_the_table_check_reports_both_sides() -> None:
    """The comparison says which names are missing on which side (what a failing CI run shows)."""
    text = (
        "<!-- settings:begin -->\n| variable | default | what |\n|---|---|---|\n| `VOXELDOSE_PORT` | 8000 | x |\n"
        "| `VOXELDOSE_NO_SUCH_THING` | - | y |\n<!-- settings:end -->"
    )
    rows = set(opsutil.guide_table(text, "settings"))
    code = set(opsutil.settings_env_names())
    msg = _diff_message("service settings", code, rows, "the table")
    assert "VOXELDOSE_DATA_DIR" in msg.split("but not in the table")[1] and "VOXELDOSE_NO_SUCH_THING" in msg
    with pytest.raises(AssertionError, match="first cell"):
        opsutil.guide_table("<!-- settings:begin -->\n| VOXELDOSE_PORT | 1 | x |\n<!-- settings:end -->", "settings")


def test_settings_names_follow_the_prefix_and_aliases() -> None:
    names = opsutil.settings_env_names()
    assert names["VOXELDOSE_DATA_DIR"] == "data_dir"
    assert names["RAY_ADDRESS"] == names["VOXELDOSE_RAY_ADDRESS"] == "ray_address"
    assert "VOXELDOSE_RAY_ADDRESS".lower() not in names and all(n == n.upper() for n in names)


def test_stack_variables_are_the_ones_compose_interpolates(guide) -> None:
    m = re.search(r"### Stack.*?\n\n(\|.*?)\n\n", guide, re.S)
    assert m, "docs/operations.md: no Stack table"
    rows = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", m.group(1), re.M))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))
    stack = used - set(opsutil.settings_env_names())  # settings interpolated there are in the settings table
    assert rows == stack, _diff_message("stack variables", stack, rows, "the Stack table")
    template = (opsutil.DOCKER / "env.example").read_text()
    for name in stack:
        assert re.search(rf"^#? ?{name}=", template, re.M), f"docker/env.example lacks {name}"


def _exposed_metric_families(tmp_path) -> set[str]:
    """Metric families of a real /metrics exposition (a migrated SQLite store, no dispatcher)."""
    pytest.importorskip("prometheus_client")
    from service.metrics import Metrics
    from service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    store.migrate()
    try:
        text = Metrics(store).exposition().decode()
    finally:
        store.dispose()
    return set(re.findall(r"^# TYPE (voxeldose_\w+) ", text, re.M))


def test_metrics_in_the_guide_are_the_exposed_ones(guide, tmp_path) -> None:
    families = _exposed_metric_families(tmp_path)
    assert {"voxeldose_jobs", "voxeldose_queue_depth", "voxeldose_ray_up"} <= families
    named = set(re.findall(r"\bvoxeldose_[a-z_]+[a-z]\b", guide)) - {"voxeldose_default"}  # the compose network

    def family(name: str) -> str | None:
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            if suffix and name.endswith(suffix) and name[: -len(suffix)] in families:
                return name[: -len(suffix)]
            if not suffix and name in families:
                return name
        return None

    unknown = {n for n in named if family(n) is None}
    assert not unknown, f"docs/operations.md lists metrics /metrics does not expose: {sorted(unknown)}"
    missing = families - {family(n) for n in named}
    assert not missing, f"/metrics exposes families docs/operations.md does not describe: {sorted(missing)}"


def test_ports_and_services_of_the_stack_are_in_the_guide(guide) -> None:
    stack = opsutil.interpolate(opsutil.load_yaml(COMPOSE), {"POSTGRES_PASSWORD": "x", "RAY_AUTH_TOKEN": "y"})
    for name in stack["services"]:
        assert f"**{name}**" in guide or f"`{name}`" in guide, f"service {name} is not described"
    ports_table = guide.split("## Ports", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| (\d+)/tcp", ports_table, re.M))
    head_args = dict(a.lstrip("-").split("=", 1) for a in stack["services"]["ray-head"]["command"] if "=" in a)
    expected = {
        "8000",
        "11112",
        "5432",
        head_args["port"],
        head_args["ray-client-server-port"],
        head_args["dashboard-port"],
        head_args["metrics-export-port"],
    }
    assert expected <= documented, f"ports missing from the guide's table: {sorted(expected - documented)}"


def test_readme_points_to_the_guide() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Operations" in readme and "docs/operations.md" in readme.split("## Operations", 1)[1]
