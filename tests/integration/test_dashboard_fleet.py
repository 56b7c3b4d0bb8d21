"""The Fleet at fleet scale (issue 18, item 3): the store ranks and pages the runs, so page 1 leads with the runs
that need a person however many there are, a search narrows them, and the totals count every matching run; the
Resources view's host scope reads gpu_1m by host (migration 010) and answers as the raw samples do. AppTest on a
store of 130 runs made inside chdb."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from test_dashboard import app_test, view  # noqa: F401
from test_dashboard_triage import row_styles

from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.read import StoreReader

RUNS = 130
BLOCKED = (0, 1)  # the two oldest runs: a block alert firing
FAILED = 5
WARNED = 2  # a warning firing
RUNNING = (127, 128, 129)  # not ended; 129 logged a step just now, the others went quiet 10 minutes ago
RESOLVED = range(10, RUNS)  # an incident that fired and resolved
SILENCED_EXPERIMENT = "exp-3"  # a silence holds every page of the runs of exp-3 (r % 4 == 3)
_ID = "concat('00000000-0000-4000-8000-', leftPad(toString(r), 12, '0'))"
# Run r logs 10 steps a minute after run r - 1 did; the newest run logs up to now.
_TS = (f"if(r = {RUNNING[-1]}, now64(3) - 20, now64(3) - toIntervalSecond(({RUNS} - r) * 60 + 600)) "
       "+ toIntervalSecond(s)")


def run_id(r: int) -> str:
    return f"00000000-0000-4000-8000-{r:012d}"


def ranked() -> list[str]:
    """Run names in the order the Fleet promises: block alert, ended badly, warned, running, the rest; newest first
    within each."""
    rest = [r for r in range(RUNS - 1, -1, -1) if r not in (*BLOCKED, FAILED, WARNED, *RUNNING)]
    return [f"run-{r}" for r in (*reversed(BLOCKED), FAILED, WARNED, *reversed(RUNNING), *rest)]


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = f"chdb://{tmp_path_factory.mktemp('fleet') / 'chdb'}"
    client = connect_store(dsn)
    try:
        migrate(client)
        client.command(f"""
            INSERT INTO run_started (event_id, run_id, experiment, team, host, seq, ts, run_name, user,
                                     hyperparameters_json, total_steps)
            SELECT concat('rs-', toString(r)), {_ID}, concat('exp-', toString(r % 4)), concat('team-', toString(r % 3)),
                   concat('node-', toString(r % 5)), 0, {_TS.replace('(s)', '(0)')}, concat('run-', toString(r)),
                   'alice', '{{}}', 10
            FROM (SELECT number AS r FROM numbers({RUNS}))""")
        client.command(f"""
            INSERT INTO steps (event_id, run_id, experiment, team, host, seq, ts, step, loss)
            SELECT concat(toString(r), '-', toString(s)), {_ID}, concat('exp-', toString(r % 4)),
                   concat('team-', toString(r % 3)), concat('node-', toString(r % 5)), s, {_TS}, s, 1.0 / s
            FROM (SELECT intDiv(number, 10) AS r, number % 10 + 1 AS s FROM numbers({RUNS} * 10))""")
        client.command(f"""
            INSERT INTO run_ended (event_id, run_id, experiment, team, host, seq, ts, status, completed_steps)
            SELECT concat('re-', toString(r)), {_ID}, concat('exp-', toString(r % 4)), concat('team-', toString(r % 3)),
                   concat('node-', toString(r % 5)), 100, {_TS.replace('(s)', '(11)')},
                   if(r = {FAILED}, 'failed', 'completed'), 10
            FROM (SELECT number AS r FROM numbers({RUNS})) WHERE r NOT IN {RUNNING}""")
        client.command(f"""
            INSERT INTO alerts (event_id, run_id, experiment, team, ts, rule, severity, state, step, message,
                                dedup_key)
            SELECT concat('a-', toString(r)), {_ID}, concat('exp-', toString(r % 4)), concat('team-', toString(r % 3)),
                   {_TS.replace('(s)', '(5)')}, if(r = {WARNED}, 'throughput_low', 'loss_not_finite'),
                   if(r = {WARNED}, 'warning', 'block'), 'firing', 5, 'test', concat({_ID}, '-rule')
            FROM (SELECT arrayJoin([{', '.join(map(str, (*BLOCKED, WARNED)))}]) AS r)""")
        client.command(f"""
            INSERT INTO alerts (event_id, run_id, experiment, team, ts, rule, severity, state, step, message,
                                dedup_key)
            SELECT concat('slow-', toString(r), state), {_ID}, concat('exp-', toString(r % 4)),
                   concat('team-', toString(r % 3)), {_TS.replace('(s)', "(if(state = 'firing', 3, 4))")},
                   'throughput_low', 'warning', state, 3, 'test', concat({_ID}, '-slow')
            FROM (SELECT number + {RESOLVED[0]} AS r, arrayJoin(['firing', 'resolved']) AS state
                  FROM numbers({len(RESOLVED)}))""")
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        client.insert("silences", [["s1", "", SILENCED_EXPERIMENT, "", "", now - timedelta(hours=1),
                                    now + timedelta(hours=1), "maintenance", "alice", now, "", None, False, now]],
                      column_names=["silence_id", "run_id", "experiment", "rule", "host", "starts_at", "ends_at",
                                    "reason", "created_by", "created_at", "removed_by", "removed_at", "expiry_noted",
                                    "updated_at"])
    finally:
        client.close()
    return dsn


def fleet_table(at) -> list[str]:
    return list(at.dataframe[0].value["run"])


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


# --- The read API ------------------------------------------------------------------------------------------------

def test_the_pages_of_the_fleet_are_the_ranked_fleet_cut_in_order_and_the_totals_count_every_run(fleet_store):
    client = connect_store(fleet_store)
    try:
        store = StoreReader(client)
        whole = store.fleet()
        pages = [store.fleet_page(offset=offset, limit=40, silenced_by=[("", SILENCED_EXPERIMENT, "")])
                 for offset in range(0, RUNS, 40)]
        found = store.fleet_page(search="EXP-1 failed")
    finally:
        client.close()
    assert [r["run_name"] for r in whole] == ranked()
    assert [r["run_id"] for page in pages for r in page["runs"]] == [r["run_id"] for r in whole], "no gap, no overlap"
    assert pages[0]["summary"] == {"runs": RUNS, "running": 3, "quiet": 2, "urgent": 2, "firing_alerts": 3,
                                   "silenced": 32}
    assert [r["quiet"] for r in pages[0]["runs"][4:7]] == [False, True, True], "129 logged just now"
    assert [r["run_name"] for r in found["runs"]] == [f"run-{FAILED}"], "every word, any case, any field"
    assert found["summary"]["runs"] == 1


# --- AppTest -----------------------------------------------------------------------------------------------------

def test_the_fleet_shows_a_page_at_a_time_with_the_urgent_runs_on_top_of_page_one(app_test, fleet_store):
    at = app_test(fleet_store)
    assert not at.exception and at.title[0].value == "Fleet"
    assert fleet_table(at) == ranked()[:50], "50 runs a page, the two blocked ones first though oldest"
    styles = row_styles(at.dataframe[0])
    assert "#ffd6d6" in styles[0] and "#ffd6d6" in styles[1] and "#ffe8c2" in styles[2] and not styles.get(3)
    assert metrics(at) == {"runs": "130", "running": "3", "quiet": "2", "block/critical": "2", "firing alerts": "3",
                           "silenced": "32"}, "totals of every run, not of the page"
    assert at.selectbox(key="run").value == run_id(BLOCKED[-1]), "the sidebar opens on the most urgent run"

    at.number_input(key="fleet-page").set_value(3).run()
    assert not at.exception
    assert fleet_table(at) == ranked()[100:], "the last 30"
    assert any("Showing 101–130" in caption.value for caption in at.caption)
    silenced = at.dataframe[0].value.set_index("run")["silenced"]
    assert all(mark.startswith("until ") == (int(name.removeprefix("run-")) % 4 == 3) for name, mark in silenced.items())

    at.selectbox(key="fleet-page-size").select(25).run()
    assert fleet_table(at) == ranked()[:25], "a new page size starts again at page 1"


def test_a_search_narrows_the_fleet_and_its_totals_and_starts_at_page_one(app_test, fleet_store):
    at = app_test(fleet_store)
    at.number_input(key="fleet-page").set_value(2).run()
    at.text_input(key="fleet-search").input("exp-1").run()
    assert not at.exception
    expected = [name for name in ranked() if int(name.removeprefix("run-")) % 4 == 1]
    assert fleet_table(at) == expected, "page 1 of the runs of exp-1, most urgent first"
    assert metrics(at)["runs"] == str(len(expected)) and metrics(at)["block/critical"] == "1"

    at.text_input(key="fleet-search").input("exp-1 FAILED").run()
    assert fleet_table(at) == [f"run-{FAILED}"]
    at.text_input(key="fleet-search").input("no-such-run").run()
    assert not at.dataframe and any("matching “no-such-run”" in info.value for info in at.info)

    at = view(at, "training")
    at = view(at, "fleet")
    assert at.text_input(key="fleet-search").value == "no-such-run", "kept across views"


# --- Resources, one host ----------------------------------------------------------------------------------------------

def test_a_hosts_gpus_come_from_the_rollup_ordered_by_host_and_agree_with_the_raw_samples(tmp_path):
    """A store with GPU samples from before migration 010 (12 runs on 3 hosts, each run's GPU 1 on the next host)
    migrates; the host scope then reads gpu_1m's projection by host and averages as the raw samples do."""
    client = connect_store(f"chdb://{tmp_path}/chdb")
    try:
        migrate(client, up_to=9)
        client.command("""
            INSERT INTO gpu_samples (event_id, run_id, host, seq, ts, rank, gpu_index, utilization_pct,
                                     memory_used_mb, memory_total_mb, temperature_c, power_w)
            SELECT toString(number), toString(r), concat('node-', toString((r + g) % 3)), i * 2 + g,
                   toDateTime64(now() - 7200, 3, 'UTC') + toIntervalSecond(i * 10), 0, g, cityHash64(number) % 100,
                   1000 + cityHash64(number, 1) % 500, 80000, 50 + cityHash64(number, 2) % 30, 300 + number % 7
            FROM (SELECT number, intDiv(number, 1440) AS r, intDiv(number, 2) % 720 AS i, number % 2 AS g
                  FROM numbers(12 * 1440))""")
        assert migrate(client) == ["010_gpu_by_host.sql"]
        series = StoreReader(client).gpu_series(host="node-1", max_points=60)  # 2 h in 60 points: the rollup
        width = int((series[1]["t"] - series[0]["t"]).total_seconds())
        raw = client.query("""
            SELECT gpu_index, toDateTime(intDiv(toUnixTimestamp(ts), {width:UInt32}) * {width:UInt32}, 'UTC') AS t,
                   avg(utilization_pct), max(memory_used_mb), max(temperature_c), avg(power_w), count()
            FROM gpu_samples WHERE host = 'node-1' GROUP BY gpu_index, t ORDER BY gpu_index, t""",
                           parameters={"width": width}).result_rows
        plan = "\n".join(row[0] for row in client.query(
            "EXPLAIN projections = 1 SELECT gpu_index, minute, sum(samples) FROM gpu_1m WHERE host = 'node-1' "
            "GROUP BY gpu_index, minute").result_rows)
    finally:
        client.close()
    assert [(p["gpu_index"], p["t"].replace(tzinfo=None), round(p["utilization_pct"], 9), p["memory_used_mb"],
             p["temperature_c"], round(p["power_w"], 9), p["samples"]) for p in series] == [
        (g, t.replace(tzinfo=None), round(u, 9), m, c, round(w, 9), n) for g, t, u, m, c, w, n in raw]
    assert width % 60 == 0 and {p["host"] for p in series} == {"node-1"}
    assert {p["gpu_index"] for p in series} == {0, 1}, "GPU 1 of node-0's runs is on node-1 too"
    assert "gpu_1m_by_host" in plan, plan


def test_alerts_show_a_page_of_incidents_at_a_time_and_count_them_all(app_test, fleet_store):
    at = view(app_test(fleet_store), "alerts")
    incidents = len(RESOLVED) + 3
    assert {m.label: m.value for m in at.metric} == {"incidents": str(incidents), "firing": "3",
                                                     "resolved": str(len(RESOLVED))}
    assert len(at.dataframe[0].value) == 100
    at.number_input(key="alerts-page").set_value(2).run()
    second = at.dataframe[0].value
    assert len(second) == incidents - 100 and not at.exception
    assert any(f"showing 101–{incidents}" in caption.value for caption in at.caption)

    at.multiselect(key="alerts-states").select("firing").run()
    firing = at.dataframe[0].value
    assert sorted(firing["run"].map(lambda label: label.split(" · ")[0])) == ["run-0", "run-1", "run-2"], \
        "back on page 1, the firing ones"
