"""The real memory limit, read from fake /proc and cgroup trees (v1, v2, nested, 'max', unreadable)."""

from __future__ import annotations

from pathlib import Path

from specrun.memory_limit import SystemPaths, _macos_levels, detect

GIB = 1 << 30
MIB = 1 << 20


def fake_system(tmp: Path, cgroup: str, mounts: list[str], host_available: int = 20 * GIB,
                anon: int = 50 * MIB) -> SystemPaths:
    proc, me = tmp / "proc", tmp / "proc" / "self"
    me.mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {24 * GIB // 1024} kB\nMemFree: 1000 kB\n"
                                  f"MemAvailable: {host_available // 1024} kB\nSwapTotal: 0 kB\n")
    (me / "cgroup").write_text(cgroup)
    (me / "mountinfo").write_text("\n".join(mounts) + "\n")
    (me / "status").write_text(f"Name: python\nVmRSS: {2 * anon // 1024} kB\nRssAnon: {anon // 1024} kB\n")
    return SystemPaths(proc=proc, self_proc=me)


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def v1_mount(point: Path, root: str = "/") -> str:
    return f"35 31 0:32 {root} {point} rw,relatime - cgroup cgroup rw,memory"


def v2_mount(point: Path, root: str = "/") -> str:
    return f"41 31 0:38 {root} {point} rw,relatime - cgroup2 cgroup2 rw"


def test_no_cgroup_limit_leaves_the_hosts_free_memory(tmp_path: Path) -> None:
    cg = tmp_path / "memory"
    write(cg / "a", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(GIB))
    paths = fake_system(tmp_path, "4:memory:/a\n", [v1_mount(cg)])
    found = detect(paths)
    assert found.available == 20 * GIB and not found.cgroup and found.limit is None
    assert found.budget == 20 * GIB + 50 * MIB  # what it holds already counts toward its budget


def test_cgroup_v1_limit_binds_less_what_is_used_but_not_page_cache(tmp_path: Path) -> None:
    cg = tmp_path / "memory"
    write(cg / "box", memory_limit_in_bytes=str(GIB), memory_usage_in_bytes=str(600 * MIB),
          memory_stat=f"cache {400 * MIB}\nrss {200 * MIB}\ntotal_cache {400 * MIB}\n")
    found = detect(fake_system(tmp_path, "4:memory:/box\n", [v1_mount(cg)]))
    assert found.cgroup and found.limit == GIB
    assert found.available == GIB - 200 * MIB  # the page cache is the kernel's to drop
    assert "memory.limit_in_bytes of /box" in found.source


def test_cgroup_v1_a_parents_limit_binds_its_children(tmp_path: Path) -> None:
    cg = tmp_path / "memory"
    write(cg / "slice", memory_limit_in_bytes=str(2 * GIB), memory_usage_in_bytes=str(GIB))
    write(cg / "slice" / "job", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(100 * MIB))
    found = detect(fake_system(tmp_path, "4:memory:/slice/job\n", [v1_mount(cg)]))
    assert found.limit == 2 * GIB and found.available == GIB  # the parent's other members hold 0.9 GiB
    assert "of /slice" in found.source


def test_cgroup_v1_hierarchical_limit_from_memory_stat(tmp_path: Path) -> None:
    """A container that sees only its own cgroup reads its parents' limit in memory.stat."""
    cg = tmp_path / "memory"
    write(cg, memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(100 * MIB),
          memory_stat=f"hierarchical_memory_limit {3 * GIB}\ntotal_cache 0\n")
    found = detect(fake_system(tmp_path, "4:memory:/docker/abc\n", [v1_mount(cg, root="/docker/abc")]))
    assert found.limit == 3 * GIB and found.available == 3 * GIB - 100 * MIB
    assert "hierarchical_memory_limit" in found.source


def test_cgroup_v2_max_and_high_nested(tmp_path: Path) -> None:
    cg = tmp_path / "unified"
    write(cg, memory_max="max")  # the root's files may say max
    write(cg / "user.slice", memory_max=str(8 * GIB), memory_high="max", memory_current=str(GIB))
    write(cg / "user.slice" / "run", memory_max="max", memory_high=str(3 * GIB), memory_current=str(2 * GIB),
          memory_stat=f"anon {GIB}\nfile {GIB}\n")
    found = detect(fake_system(tmp_path, "0::/user.slice/run\n", [v2_mount(cg)]))
    assert found.limit == 3 * GIB and found.available == 2 * GIB  # memory.high of the leaf, its 1 GiB of cache free
    assert "memory.high of /user.slice/run" in found.source
    assert len([lv for lv in found.levels if lv.source.startswith("cgroup")]) == 2


def test_cgroup_v2_namespace_sees_itself_as_root(tmp_path: Path) -> None:
    cg = tmp_path / "unified"
    write(cg, memory_max=str(GIB), memory_current=str(100 * MIB))
    found = detect(fake_system(tmp_path, "0::/\n", [v2_mount(cg)]))
    assert found.limit == GIB and found.available == GIB - 100 * MIB


def test_the_host_binds_when_it_has_less_than_the_cgroup_allows(tmp_path: Path) -> None:
    cg = tmp_path / "memory"
    write(cg / "box", memory_limit_in_bytes=str(16 * GIB), memory_usage_in_bytes="0")
    found = detect(fake_system(tmp_path, "4:memory:/box\n", [v1_mount(cg)], host_available=2 * GIB))
    assert found.available == 2 * GIB and found.source.startswith("MemAvailable") and found.limit is None


def test_unreadable_files_are_skipped_not_fatal(tmp_path: Path) -> None:
    cg = tmp_path / "memory"
    write(cg / "box", memory_usage_in_bytes="0")
    (cg / "box" / "memory.limit_in_bytes").mkdir()  # reading it fails, as an unreadable file does (even as root)
    found = detect(fake_system(tmp_path, "4:memory:/box\n", [v1_mount(cg)]))
    assert found.available == 20 * GIB


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    """A limit file with garbage, a group missing from the mount, no mountinfo line: no crash,
    and what can be read is used."""
    cg = tmp_path / "memory"
    write(cg, memory_limit_in_bytes="not a number\n")
    found = detect(fake_system(tmp_path, "4:memory:/gone\nbroken line\n", [v1_mount(cg), "nonsense"]))
    assert found.available == 20 * GIB
    paths = fake_system(tmp_path / "b", "", [])
    (paths.proc / "meminfo").unlink()
    assert detect(paths).source.startswith("unknown")


def test_a_directory_named_like_a_mount_root_prefix_is_not_cut(tmp_path: Path) -> None:
    """root /docker does not make /dockerX relative to it."""
    cg = tmp_path / "memory"
    write(cg / "dockerX", memory_limit_in_bytes=str(GIB), memory_usage_in_bytes="0")
    write(cg, memory_limit_in_bytes=str(4 * GIB), memory_usage_in_bytes="0")
    found = detect(fake_system(tmp_path, "4:memory:/dockerX\n", [v1_mount(cg, root="/docker")]))
    assert found.limit == GIB


def test_macos_vm_stat() -> None:
    vm_stat = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\nPages free:   1000.\n"
               "Pages active:  5000.\nPages inactive:  3000.\nPages speculative:  500.\nPages purgeable: 500.\n")
    (level,) = _macos_levels("17179869184\n", vm_stat)
    assert level.available == 5000 * 16384 and level.limit == 16 * GIB
    assert _macos_levels(None, None) == []


def test_this_machine_reads_without_error() -> None:
    found = detect()
    assert found.available > 0 and found.held >= 0 and found.describe()
