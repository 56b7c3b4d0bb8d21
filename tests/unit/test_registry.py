"""Registry transitions allowed and refused, roles, and the audit log's hash chain catching tampering."""

import dataclasses
from datetime import datetime, timezone

import pytest

from trainwire.infra.store.audit_chain import GENESIS, next_entry, verify_chain
from trainwire.consumers.governance.registry import (
    SYSTEM_ACTOR, ApprovalEvidence, RegistryError, Roles, Transition, check_transition, current_stage,
)

OPEN = Roles()
READY = ApprovalEvidence(requester="alice", g6_passed=True, trail_verified=True)


def move(from_stage, to_stage, actor="alice", reason="", roles=OPEN, approval=None):
    check_transition(Transition("r1", from_stage, to_stage, actor, reason), roles, approval)


def test_the_path_to_production():
    move("None", "Candidate", SYSTEM_ACTOR)
    move("Candidate", "Staging", "alice")
    move("Staging", "Production", "bob", approval=READY)
    move("Production", "Archived", "carol", reason="superseded by run r2")


@pytest.mark.parametrize("from_stage, to_stage", [
    ("None", "Staging"), ("None", "Production"), ("Candidate", "Production"), ("Production", "Staging"),
    ("Archived", "Candidate"), ("Archived", "Archived"), ("Staging", "Candidate"),
])
def test_other_transitions_are_refused_naming_from_and_to(from_stage, to_stage):
    before = "no stage" if from_stage == "None" else from_stage  # the registry's "None" reads as no stage yet
    with pytest.raises(RegistryError, match=f"run r1: {before} → {to_stage} refused: not an allowed"):
        move(from_stage, to_stage, SYSTEM_ACTOR if to_stage == "Candidate" else "bob", reason="x", approval=READY)


def test_unknown_stage_is_refused():
    with pytest.raises(RegistryError, match="unknown stage"):
        move("Candidate", "Shipped")


def test_only_trainwire_makes_a_candidate():
    with pytest.raises(RegistryError, match="Candidate is set by trainwire when all gates pass"):
        move("None", "Candidate", "alice")


def test_requester_cannot_approve_their_own_request():
    with pytest.raises(RegistryError, match="approver must be someone other than the requester \\(alice\\)"):
        move("Staging", "Production", "alice", approval=READY)


def test_production_needs_g6_passed():
    evidence = dataclasses.replace(READY, g6_passed=False, g6_message="missing: input_artifacts.dataset.sha256")
    with pytest.raises(RegistryError, match="G6 audit completeness has not passed \\(missing: input_artifacts"):
        move("Staging", "Production", "bob", approval=evidence)


def test_production_needs_a_verified_trail():
    evidence = dataclasses.replace(READY, trail_verified=False, trail_problems=["entry 3: altered"])
    with pytest.raises(RegistryError, match="audit trail does not verify: entry 3: altered"):
        move("Staging", "Production", "bob", approval=evidence)


@pytest.mark.parametrize("reason", ["", "   "])
def test_archive_needs_a_reason(reason):
    with pytest.raises(RegistryError, match="no stage → Archived refused: archiving needs a reason"):
        move("None", "Archived", reason=reason)


def test_roles_file_restricts_who_may_do_what(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text('requester = ["*"]\napprover = ["carol"]\narchiver = ["carol", "dave"]\n')
    roles = Roles.load(path)
    move("Candidate", "Staging", "anyone", roles=roles)
    move("Staging", "Production", "carol", roles=roles, approval=READY)
    with pytest.raises(RegistryError, match="bob does not hold the approver role"):
        move("Staging", "Production", "bob", roles=roles, approval=READY)
    with pytest.raises(RegistryError, match="alice does not hold the archiver role"):
        move("Production", "Archived", "alice", reason="old", roles=roles)


def test_roles_file_with_an_unknown_role_is_a_clear_error(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text('approvers = ["carol"]\n')
    with pytest.raises(ValueError, match="unknown role key approvers"):
        Roles.load(path)


def test_without_a_roles_file_every_actor_holds_every_role(tmp_path):
    assert Roles.load(tmp_path / "absent.toml").allows("anyone", "approver")


def test_current_stage_is_the_last_transitions_target():
    assert current_stage([]) == "None"
    assert current_stage([Transition("r1", "None", "Candidate", SYSTEM_ACTOR),
                          Transition("r1", "Candidate", "Staging", "alice")]) == "Staging"


def chain(n=5):
    entries, previous = [], None
    for i in range(n):
        previous = next_entry(previous, "alice", "registry.viewed", "r1", {"i": i},
                              now=datetime(2024, 5, 1, 12, 0, i, tzinfo=timezone.utc))
        entries.append(previous)
    return entries


def test_an_untouched_chain_verifies_and_reports_its_head():
    entries = chain()
    result = verify_chain(entries)
    assert result.ok and result.entries == 5 and result.head == entries[-1].entry_hash
    assert entries[0].prev_hash == GENESIS and entries[1].prev_hash == entries[0].entry_hash


def test_an_altered_entry_is_detected():
    entries = chain()
    entries[2] = dataclasses.replace(entries[2], actor="mallory")
    assert verify_chain(entries).problems == ["entry 2: altered (its hash does not match its contents)"]


def test_an_altered_entry_with_a_recomputed_hash_breaks_the_next_link():
    entries = chain()
    forged = dataclasses.replace(entries[2], details='{"i":99}')
    entries[2] = dataclasses.replace(forged, entry_hash=forged.computed_hash())
    assert verify_chain(entries).problems == ["entry 3: does not follow entry 2 (previous hash differs)"]


def test_a_deleted_entry_is_detected():
    entries = chain()
    del entries[1]
    assert verify_chain(entries).problems == ["entries 1: missing (deleted)"]


def test_a_duplicated_sequence_number_is_detected():
    entries = chain()
    entries.insert(3, next_entry(entries[1], "mallory", "registry.transition", "r1", {}))
    assert "entry 2: appears more than once" in verify_chain(entries).problems[0]


def test_a_rewritten_tail_is_caught_by_a_head_noted_earlier():
    entries = chain()
    head = entries[-1].entry_hash
    rewritten = entries[:3]
    for i in range(2):  # a forger rebuilds a consistent tail
        rewritten.append(next_entry(rewritten[-1], "mallory", "registry.viewed", "r1", {"i": i}))
    assert verify_chain(rewritten).ok
    assert "is not in the log" in verify_chain(rewritten, head=head).problems[0]
