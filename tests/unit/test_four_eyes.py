"""Four-eyes for real (issue 15, item 7): one person respelt is still one person, roles, acting for others.

The Governance cases run on a real embedded store (chdb) and read the refusals back from its audit log.
"""

import json

import pytest

from trainwire.consumers.governance import Governance
from trainwire.consumers.governance.registry import (
    ROLES, ApprovalEvidence, RegistryError, Roles, Transition, check_transition, normalise_actor,
)
from trainwire.infra.store.read import StoreReader

ALICE_RESPELT = ["alice ", " alice", "Alice", "ALICE", "ａｌｉｃｅ", "alice\u200b", "\u3000alice", "ＡＬＩＣＥ"]


@pytest.mark.parametrize("name", ALICE_RESPELT)
def test_a_respelt_name_normalises_to_the_same_actor(name):
    assert normalise_actor(name) == "alice"


def test_normalising_folds_case_beyond_ascii_and_compatibility_forms():
    assert normalise_actor("STRASSE") == normalise_actor("straße")
    assert normalise_actor("ﬁona") == "fiona"  # the ligature is two letters
    assert normalise_actor("Ops Alice") == "ops alice"  # inner spaces are part of a name


@pytest.mark.parametrize("name", ["", "   ", "\u3000", "\u200b", "al\nice"])
def test_an_actor_that_is_empty_once_trimmed_or_holds_a_control_character_is_refused(name):
    with pytest.raises(ValueError, match="actor"):
        normalise_actor(name)


@pytest.mark.parametrize("approver", ALICE_RESPELT)
def test_the_requester_respelt_cannot_approve(approver):
    ready = ApprovalEvidence(requester="alice", g6_passed=True, trail_verified=True)
    with pytest.raises(RegistryError, match="approver must be someone other than the requester"):
        check_transition(Transition("r1", "Staging", "Production", approver), Roles(), ready)


def test_a_requester_recorded_respelt_before_normalising_is_still_the_requester():
    ready = ApprovalEvidence(requester="Alice ", g6_passed=True, trail_verified=True)
    with pytest.raises(RegistryError, match="approver must be someone other than the requester"):
        check_transition(Transition("r1", "Staging", "Production", "alice"), Roles(), ready)


def roles_file(tmp_path, text):
    path = tmp_path / "roles.toml"
    path.write_text(text)
    return Roles.load(path)


def test_role_members_are_compared_normalised(tmp_path):
    roles = roles_file(tmp_path, 'approver = ["Carol "]\n')
    assert roles.allows("carol", "approver") and roles.allows("ＣＡＲＯＬ", "approver")
    assert not roles.allows("dave", "approver") and not roles.allows("  ", "approver")


def test_admin_holds_every_role(tmp_path):
    roles = roles_file(tmp_path, 'admin = ["root"]\nviewer = ["*"]\n')
    assert all(roles.allows("Root", role) for role in ROLES)
    assert roles.may_act_for("root", "bob")
    assert roles.allows("anyone", "viewer") and not roles.allows("anyone", "approver")


def test_without_a_roles_file_everyone_holds_every_role_but_acting_for_others(tmp_path):
    roles = Roles.load(tmp_path / "absent.toml")
    assert all(roles.allows("anyone", role) for role in ROLES - {"act_for_others"})
    assert not roles.allows("anyone", "act_for_others")
    assert roles.may_act_for("alice", "Alice ") and not roles.may_act_for("alice", "bob")


def test_acting_for_others_needs_the_os_user_listed(tmp_path):
    roles = roles_file(tmp_path, 'act_for_others = ["ci-runner"]\n')
    assert roles.may_act_for("ci-runner", "alice") and roles.may_act_for("CI-Runner", "bob")
    assert not roles.may_act_for("alice", "bob") and roles.may_act_for("alice", "alice")


def test_an_unknown_role_key_names_the_key_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"roles file {tmp_path / 'roles.toml'}: unknown role key approvers"):
        roles_file(tmp_path, 'approvers = ["carol"]\n')


def test_a_role_member_that_does_not_normalise_is_an_error_naming_the_role(tmp_path):
    with pytest.raises(ValueError, match="roles.toml: approver: actor ' ': empty"):
        roles_file(tmp_path, 'approver = [" "]\n')


def test_asking_about_an_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="unknown role 'approvers'"):
        Roles().allows("carol", "approvers")


def audit_entries(client, action):
    return [entry for entry in StoreReader(client).audit_log() if entry["action"] == action]


def test_acting_for_another_without_act_for_others_is_refused_and_logged(client):
    governance = Governance(client)
    with pytest.raises(ValueError, match="--actor 'Bob' refused: alice is not in act_for_others"):
        governance.actions()["registry_status"](actor="Bob", os_user="alice")
    [refused] = audit_entries(client, "actor.refused")
    assert refused["actor"] == "alice" and json.loads(refused["details"])["claimed"] == "Bob"
    assert audit_entries(client, "registry.viewed") == []  # refused before it ran


def test_an_actor_that_does_not_normalise_is_refused_and_logged(client):
    with pytest.raises(ValueError, match="refused: actor ' ': empty"):
        Governance(client).act_as(" ", os_user="alice")
    [refused] = audit_entries(client, "actor.refused")
    assert json.loads(refused["details"])["claimed"] == " "


def test_an_operation_without_the_os_user_is_refused(client):
    with pytest.raises(ValueError, match="no os_user"):
        Governance(client).actions()["verify"](actor="alice")


def test_acting_as_oneself_respelt_or_for_others_when_listed(client, tmp_path):
    governance = Governance(client, roles_file(tmp_path, 'act_for_others = ["ci-runner"]\n'))
    governance.actions()["registry_status"](actor=" Alice", os_user="alice")
    governance.actions()["registry_status"](actor="Bob", os_user="ci-runner")
    assert [e["actor"] for e in audit_entries(client, "registry.viewed")] == ["alice", "bob"]
    assert audit_entries(client, "actor.refused") == []


def test_a_roles_file_without_viewer_keeps_the_dashboard_open_and_an_empty_one_closes_it(tmp_path):
    registry_only = roles_file(tmp_path, 'approver = ["carol"]\n')
    assert registry_only.allows("anyone", "viewer") and not registry_only.allows("anyone", "approver")
    (tmp_path / "closed").mkdir()
    closed = roles_file(tmp_path / "closed", 'viewer = []\nadmin = ["root"]\n')
    assert not closed.allows("anyone", "viewer") and closed.allows("root", "viewer")
