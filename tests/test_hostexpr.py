"""Node-set expansion, folding and literal host parsing (pure string logic)."""

import random

import pytest

from ebpfdiag.hostexpr import (
    MAX_NAMES,
    Literal,
    PatternError,
    compress_names,
    expand,
    expand_ansible,
    parse_literal,
    split_terms,
)


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("lb1", ["lb1"]),
        ("web[01-03]", ["web01", "web02", "web03"]),
        ("web[1-3]", ["web1", "web2", "web3"]),
        ("web[08-10]", ["web08", "web09", "web10"]),
        ("web[01,03,05-07]", ["web01", "web03", "web05", "web06", "web07"]),
        ("web[5]", ["web5"]),
        ("db-[a-c]", ["db-a", "db-b", "db-c"]),
        ("n[001-002].dc", ["n001.dc", "n002.dc"]),
        (
            "rack[1-2]-node[1-3]",
            [
                "rack1-node1",
                "rack1-node2",
                "rack1-node3",
                "rack2-node1",
                "rack2-node2",
                "rack2-node3",
            ],
        ),
        ("198.18.1.[1-3]", ["198.18.1.1", "198.18.1.2", "198.18.1.3"]),
    ],
)
def test_expand(pattern, names):
    assert expand(pattern) == names


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("web[03-01]", "03 is after 01"),
        ("web[01-03", "unbalanced"),
        ("web01-03]", "unbalanced"),
        ("web[[1-2]]", "unbalanced or nested"),
        ("web[x-3]", "cannot read 'x-3'"),
        ("web[1:3]", "cannot read '1:3'"),
        ("web[]", "cannot read ''"),
    ],
)
def test_expand_errors(pattern, message):
    with pytest.raises(PatternError, match=message):
        expand(pattern)


def test_expand_limit_is_checked_before_expanding():
    assert len(expand("n[1-100000]")) == MAX_NAMES
    with pytest.raises(PatternError, match="expands to 100001 names"):
        expand("n[0-100000]")
    with pytest.raises(PatternError, match=r"expands to 1000000000000 names"):
        expand("a[1-1000000]b[1-1000000]")


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("web[01:03]", ["web01", "web02", "web03"]),
        ("web[1:3]", ["web1", "web2", "web3"]),
        ("n[1:10:3]", ["n1", "n4", "n7", "n10"]),
        ("db-[a:c]", ["db-a", "db-b", "db-c"]),
        ("db-[a:e:2]", ["db-a", "db-c", "db-e"]),
        ("h[:2]", ["h0", "h1", "h2"]),
        ("r[1:2]n[1:2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_expand_ansible(pattern, names):
    assert expand_ansible(pattern) == names


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("web[01:100]", "equal length"),
        ("web[3:1]", "3 is after 1"),
        ("web[1:a]", "not the same kind"),
        ("web[1-3]", r"expected \[begin:end\]"),
        ("web[1:3:0]", "step must be at least 1"),
        ("web[1:]", r"expected \[begin:end\]"),
    ],
)
def test_expand_ansible_errors(pattern, message):
    with pytest.raises(PatternError, match=message):
        expand_ansible(pattern)


def test_split_terms_keeps_commas_inside_brackets():
    assert split_terms("web[01,03],lb1 db1,, !x ") == ["web[01,03]", "lb1", "db1", "!x"]
    assert split_terms("[fe80::1]:22,a") == ["[fe80::1]:22", "a"]
    assert split_terms("") == []
    with pytest.raises(PatternError, match=r"unbalanced '\['"):
        split_terms("web[01,02")
    with pytest.raises(PatternError, match=r"unbalanced '\]'"):
        split_terms("web01]")


@pytest.mark.parametrize(
    ("text", "literal"),
    [
        ("ops@198.18.0.9", Literal("ops", "198.18.0.9", None)),
        ("ops@198.18.0.9:2222", Literal("ops", "198.18.0.9", 2222)),
        ("198.18.0.9:2222", Literal(None, "198.18.0.9", 2222)),
        ("198.18.0.9", Literal(None, "198.18.0.9", None)),
        ("gw.lab:22", Literal(None, "gw.lab", 22)),
        ("ops@gw.lab", Literal("ops", "gw.lab", None)),
        ("[2001:db8::1]:2222", Literal(None, "2001:db8::1", 2222)),
        ("[2001:db8::1]", Literal(None, "2001:db8::1", None)),
        ("ops@[2001:db8::1]:22", Literal("ops", "2001:db8::1", 22)),
        ("2001:db8::1", Literal(None, "2001:db8::1", None)),
        ("::1", Literal(None, "::1", None)),
        ("web01", None),
        ("web[01-03]", None),
        ("ops@198.18.1.[1-3]", None),
        ("web[01-02]:22", None),
    ],
)
def test_parse_literal(text, literal):
    assert parse_literal(text) == literal


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("h:0", "port 0 out of range"),
        ("h:65536", "port 65536 out of range"),
        ("ops@[::1]:70000", "port 70000 out of range"),
        ("h:ssh", "bad port 'ssh'"),
        ("h:", "bad port ''"),
        ("@h", "empty user"),
        ("ops@", "empty address"),
        (":22", "empty address"),
        ("a:b:c", r"as \[addr\]:port"),
    ],
)
def test_parse_literal_errors(text, message):
    with pytest.raises(PatternError, match=message):
        parse_literal(text)


@pytest.mark.parametrize(
    ("names", "folded"),
    [
        (["web01", "web02", "web03", "web05", "lb1"], "web[01-03,05],lb1"),
        (["web09", "web10", "web11"], "web[09-11]"),
        (["web9", "web10"], "web[9-10]"),
        (["lb1"], "lb1"),
        (["lb1", "lb1"], "lb1"),
        (["bastion", "db"], "bastion,db"),
        ([], ""),
        (
            [f"rack{r}-node{n}" for r in (1, 2, 3) for n in range(1, 9)],
            "rack[1-3]-node[1-8]",
        ),
        (["198.18.1.1", "198.18.1.2", "198.18.2.7"], "198.18.1.[1-2],198.18.2.7"),
        (["ops@[::1]:22", "web1"], "ops@[::1]:22,web1"),
    ],
)
def test_compress_names(names, folded):
    assert compress_names(names) == folded


@pytest.mark.parametrize(
    "names",
    [
        expand("web[01-20]") + ["web9", "web100", "lb1", "lb2", "x"],
        expand("rack[1-3]-node[01-12]") + expand("rack4-node[01-03]"),
        expand("n[0-9]") + expand("n[00-09]") + ["n000"],
        expand("198.18.[0-3].[1-40]"),
        ["a1b2c3", "a1b2c4", "a2b2c3", "zz", "q0", "q00", "q007"],
    ],
)
def test_compress_round_trip(names):
    folded = compress_names(names)
    expanded = [name for part in split_terms(folded) for name in expand(part)]
    assert sorted(expanded) == sorted(set(names))
    assert len(expanded) == len(set(names))
    assert len(folded) < len(",".join(names))


def test_compress_is_the_inverse_of_expand_for_a_fleet():
    names = expand("web[001-120,122]")
    assert compress_names(names) == "web[001-120,122]"
    assert compress_names(reversed(names)) == "web[001-120,122]"
    mixed = expand("web[001-003]") + ["bastion"] + expand("db[1-2]") + expand("web[7-8]")
    assert compress_names(mixed) == "web[001-003],bastion,db[1-2],web[7-8]"


def _random_names(rng: random.Random) -> list[str]:
    """Names of every shape a fleet mixes: padded or not, several prefixes, several numeric
    fields, addresses, and names without digits."""
    names = []
    for _ in range(rng.randint(1, 60)):
        prefix = rng.choice(["web", "db-", "rack", "n", "x.y", "a1b"])
        kind = rng.random()
        if kind < 0.1:
            names.append(rng.choice(["bastion", "db", "gw"]))
        elif kind < 0.6:
            names.append(prefix + str(rng.randint(0, 120)).zfill(rng.choice([0, 2, 3])))
        elif kind < 0.85:
            node = str(rng.randint(0, 15)).zfill(rng.choice([0, 2]))
            names.append(f"{prefix}{rng.randint(0, 12)}-n{node}")
        else:
            names.append(f"198.18.{rng.randint(0, 3)}.{rng.randint(1, 30)}")
    return names


def test_compress_round_trips_random_fleets():
    for seed in range(400):
        names = _random_names(random.Random(seed))
        folded = compress_names(names)
        expanded = [name for part in split_terms(folded) for name in expand(part)]
        assert sorted(expanded) == sorted(set(names)), (seed, folded)
        assert len(expanded) == len(set(names)), (seed, folded)
