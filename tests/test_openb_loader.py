"""The openb loader: bundled traces, both file formats, and one clear error per bad row."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexai.sim.openb import TraceFormatError, bundled_names, load_nodes, load_pods

HEADER11 = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time"
)


def write(tmp_path: Path, text: str, name: str = "pods.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bundled_default_trace_matches_the_paper() -> None:
    pods = load_pods("default")
    nodes = load_nodes("gpu")
    assert len(pods.requests) == 8152
    assert len(nodes.nodes) == 1213 and sum(n.device_count for n in nodes.nodes) == 6212
    profile = pods.profile()
    # FGD's target workload: 91 distinct shapes, the 35 most popular cover 95 % of pods.
    assert len(set(pods.shapes())) == 91 and len(profile.shapes) == 35
    assert abs(sum(profile.weights) - 1) < 1e-9


def test_bundled_names_list_every_variant() -> None:
    names = bundled_names("pods")
    for name in [
        "default",
        "gpushare40",
        "gpushare80",
        "gpuspec10",
        "gpuspec25",
        "multigpu20",
        "multigpu40",
        "cpu050",
        "cpu200",
    ]:
        assert name in names
    assert bundled_names("nodes") == ["all", "gpu"]


def test_five_column_multigpu_format(tmp_path: Path) -> None:
    path = write(tmp_path, "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np1,8000,1024,8,1000\np2,4000,512,0,0\n")
    trace = load_pods(path)
    assert [r.device_count for r in trace.requests] == [8, 0]
    assert trace.spec_labels == ("", "")


def test_spec_and_clipping(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER11 + "\np1,8000,1024,1,1200,V100M16|V100M32|,LS,Running,0,1,0\n")
    request = load_pods(path).requests[0]
    assert request.share_milli == 1000  # clipped to a whole GPU, as the artifact does
    assert request.allowed_models == frozenset({"V100M16", "V100M32"})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "p1,abc,1024,1,500,,LS,Running,0,1,0",
            "pods.csv:2: column cpu_milli: value 'abc' is not allowed: an integer >= 0",
        ),
        ("p1,8000,-1,1,500,,LS,Running,0,1,0", "pods.csv:2: column memory_mib: value '-1' is not allowed"),
        (
            "p1,8000,1024,99,1000,,LS,Running,0,1,0",
            "pods.csv:2: column num_gpu: value '99' is not allowed: an integer in 0..64",
        ),
        (
            "p1,8000,1024,2,500,,LS,Running,0,1,0",
            "pods.csv:2: column gpu_milli: value 500 is not allowed: 1000 when num_gpu = 2",
        ),
        ("p1,8000,1024,1,0,,LS,Running,0,1,0", "pods.csv:2: column gpu_milli: value '0' is not allowed"),
        ("p1,8000", "pods.csv:2: 2 columns, the header has 11"),
    ],
)
def test_bad_row_names_file_line_column_and_value(tmp_path: Path, row: str, message: str) -> None:
    path = write(tmp_path, HEADER11 + "\n" + row + "\n")
    with pytest.raises(TraceFormatError) as info:
        load_pods(path)
    assert message in str(info.value)


def test_missing_header_column_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="header lacks column"):
        load_pods(write(tmp_path, "name,cpu_milli\np,1\n"))
    with pytest.raises(TraceFormatError, match="not found: give a path to a CSV file or one of: .*default"):
        load_pods(str(tmp_path / "nope.csv"))
    with pytest.raises(TraceFormatError, match="the file is empty"):
        load_pods(write(tmp_path, ""))


def test_bad_node_rows(tmp_path: Path) -> None:
    header = "sn,cpu_milli,memory_mib,gpu,model\n"
    with pytest.raises(TraceFormatError, match="nodes.csv:3: column sn: value 'n1' is not allowed: a unique"):
        load_nodes(write(tmp_path, header + "n1,1000,10,1,T4\nn1,1000,10,1,T4\n", "nodes.csv"))
    with pytest.raises(TraceFormatError, match="nodes.csv:2: column model: value '' is not allowed"):
        load_nodes(write(tmp_path, header + "n1,1000,10,2,\n", "nodes.csv"))
