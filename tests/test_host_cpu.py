"""The CPU identity that keys stored cost curves."""

from __future__ import annotations

from specrun.engines.host_cpu import cpu_identity, describe_cpu, parse_cpuinfo

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm crc32
CPU implementer\t: 0x41
Hardware\t: BCM2835
"""


def test_x86_name_and_flags_of_the_first_core() -> None:
    name, flags = parse_cpuinfo(X86)
    assert name == "AMD EPYC 9R14"
    assert {"avx2", "avx512f", "avx512_bf16"} <= flags
    assert describe_cpu(name, flags, 2) == "AMD EPYC 9R14, 2 cores, avx512f"


def test_arm_board_and_a_cpu_without_vector_units() -> None:
    name, flags = parse_cpuinfo(ARM)
    assert (name, "asimd" in flags) == ("BCM2835", True)
    assert describe_cpu(name, flags, 4) == "BCM2835, 4 cores, asimd"
    assert describe_cpu("Old", frozenset({"sse2"}), None) == "Old, 1 cores"


def test_machines_that_differ_get_different_identities() -> None:
    avx2 = describe_cpu("AMD EPYC", frozenset({"avx2"}), 2)
    avx512 = describe_cpu("AMD EPYC", frozenset({"avx2", "avx512f"}), 2)
    assert len({avx2, avx512, describe_cpu("AMD EPYC", frozenset({"avx2"}), 4)}) == 3
    assert cpu_identity()  # this machine's, whatever it is
