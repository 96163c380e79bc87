"""The documented commands, run as a user would: real subprocesses against the real broker."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

from conftest import free_port
from kafka_helpers import consume

from infra.settings import Settings
from streams import validate_json
from streams.producer import HEADER_ERROR_CLASS, HEADER_SOURCE

GOOD = [
    {
        "type": "impression",
        "event_id": "i1",
        "event_time": "2026-01-05T10:00:00Z",
        "user_id": "u1",
        "ad_id": "a1",
        "campaign_id": "c1",
        "advertiser_id": "v1",
    },
    {
        "type": "click",
        "event_id": "k1",
        "event_time": "2026-01-05T10:00:03Z",
        "user_id": "u1",
        "impression_id": "i1",
        "ad_id": "a1",
        "campaign_id": "c1",
        "advertiser_id": "v1",
    },
    {
        "type": "search",
        "event_id": "s1",
        "event_time": "2026-01-05T10:01:00+01:00",
        "user_id": "u2",
        "query": "running shoes",
    },
    {
        "type": "user_profile",
        "event_id": "p1",
        "event_time": "2026-01-05T09:00:00Z",
        "user_id": "u3",
        "attributes": {"country": "FR", "age": 40},
        "interests": ["travel"],
    },
]


def run(
    bin_path: str, args: list[str], env: dict[str, str], stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_path, *args],
        env=env,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def mixed_file(path: Path) -> Path:
    lines = [
        json.dumps(GOOD[0]),  # 1
        json.dumps(GOOD[1]),  # 2
        "{this is not json",  # 3  malformed
        "",  # 4  blank: skipped, not an error
        json.dumps({**GOOD[0], "event_id": "i2", "type": "teleport"}),  # 5 unknown type
        json.dumps({k: v for k, v in GOOD[2].items() if k != "query"}),  # 6 missing field
        json.dumps({**GOOD[0], "event_id": "i3", "position": "first"}),  # 7 wrong type
        json.dumps(GOOD[2]),  # 8
        json.dumps(GOOD[3]),  # 9
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_produce_file_reports_bad_lines_and_delivers_good_ones(
    tmp_path: Path, kafka: Settings, cli_env: dict[str, str], adreach_bin: str
) -> None:
    result = run(adreach_bin, ["produce", str(mixed_file(tmp_path / "events.jsonl"))], cli_env)
    assert result.returncode == 1, result.stderr
    assert "sent 4 events" in result.stdout and "rejected 4 lines" in result.stdout
    for line, error in [
        (3, "MalformedJSONError"),
        (5, "UnknownEventTypeError"),
        (6, "SchemaViolationError: Object missing required field `query`"),
        (7, "SchemaViolationError: Expected `int`, got `str`"),
    ]:
        assert f"events.jsonl:{line}: {error}" in result.stderr, result.stderr

    delivered = consume(kafka, kafka.kafka.topics.events, expected=4)
    assert sorted(validate_json(r.value).event_id for r in delivered) == ["i1", "k1", "p1", "s1"]
    dead = consume(kafka, kafka.kafka.topics.dead_letter, expected=4)
    sources = {r.headers[HEADER_SOURCE].decode(): r for r in dead}
    assert set(sources) == {"events.jsonl:3", "events.jsonl:5", "events.jsonl:6", "events.jsonl:7"}
    assert sources["events.jsonl:3"].value == b"{this is not json"
    assert sources["events.jsonl:5"].headers[HEADER_ERROR_CLASS] == b"UnknownEventTypeError"


def test_dead_letters_shows_the_newest_rejects_with_their_reasons(
    tmp_path: Path, cli_env: dict[str, str], adreach_bin: str
) -> None:
    empty = run(adreach_bin, ["dead-letters"], cli_env)
    assert empty.returncode == 0 and "no dead letters in" in empty.stdout, empty.stderr
    run(adreach_bin, ["produce", str(mixed_file(tmp_path / "events.jsonl"))], cli_env)
    listed = run(adreach_bin, ["dead-letters", "--json"], cli_env)
    rows = {row["source"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == {f"events.jsonl:{n}" for n in (3, 5, 6, 7)}
    assert rows["events.jsonl:3"]["value"] == "{this is not json"
    assert rows["events.jsonl:5"]["error_class"] == "UnknownEventTypeError"
    assert all(row["failed_at"].endswith("Z") for row in rows.values())
    shown = run(adreach_bin, ["dead-letters", "--limit", "2"], cli_env)  # (rejected in one millisecond:
    assert shown.returncode == 0, shown.stderr  # any two of them are the newest)
    said = [line for line in shown.stdout.splitlines() if "  events.jsonl:" in line]
    assert len(said) == 2 and "2 newest dead letters" in shown.stdout
    assert all(
        f"{row['source']}: {row['reason']}" in shown.stdout
        for row in rows.values()
        if row["source"] in shown.stdout
    )
    assert (
        "events.jsonl:6: Object missing required field `query`"
        in run(adreach_bin, ["dead-letters"], cli_env).stdout
    )
    missing = run(
        adreach_bin, ["dead-letters"], {**cli_env, "ADREACH_KAFKA__TOPICS__DEAD_LETTER": "no.such.dlq"}
    )
    assert missing.returncode == 3 and "does not exist" in missing.stderr


def test_produce_from_stdin_with_only_good_lines_exits_zero(
    kafka: Settings, cli_env: dict[str, str], adreach_bin: str
) -> None:
    # A UTF-8 byte order mark (Windows editors write one) opens the input and CRLF ends lines.
    payload = b"\xef\xbb\xbf" + "".join(json.dumps(e) + "\r\n" for e in GOOD).encode()
    result = run(adreach_bin, ["produce", "-"], cli_env, stdin=payload)
    assert result.returncode == 0, result.stderr
    assert "sent 4 events" in result.stdout and "rejected 0 lines" in result.stdout
    assert len(consume(kafka, kafka.kafka.topics.events, expected=4)) == 4
    assert "warning" not in result.stderr
    # --topic naming a topic the cluster does not have (a typo?): said, then sent as asked
    elsewhere = run(
        adreach_bin, ["produce", "--topic", f"{kafka.kafka.topics.events}.typo", "-"], cli_env, stdin=payload
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert f"warning: topic '{kafka.kafka.topics.events}.typo' does not exist" in elsewhere.stderr


def test_produce_reads_gzip_files_and_stdin_and_says_where_a_truncated_one_stopped(
    tmp_path: Path, kafka: Settings, cli_env: dict[str, str], adreach_bin: str
) -> None:
    # Told by the bytes, not the name: a gzip file without .gz and stdin are decompressed too.
    packed = gzip.compress(mixed_file(tmp_path / "events.jsonl").read_bytes())
    (tmp_path / "export").write_bytes(packed)
    from_file = run(adreach_bin, ["produce", str(tmp_path / "export")], cli_env)
    assert from_file.returncode == 1, from_file.stderr  # the file's own bad lines, as with plain text
    assert "sent 4 events" in from_file.stdout and "rejected 4 lines" in from_file.stdout
    assert "export:3: MalformedJSONError" in from_file.stderr
    good = gzip.compress("".join(json.dumps(e) + "\n" for e in GOOD).encode())
    from_stdin = subprocess.run(
        [adreach_bin, "produce", "-"], env=cli_env, input=good, capture_output=True, timeout=120
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert b"sent 4 events" in from_stdin.stdout and b"rejected 0 lines" in from_stdin.stdout
    assert len(consume(kafka, kafka.kafka.topics.events, expected=8)) == 8

    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) * 2 // 3])  # truncated mid-stream
    cut = run(adreach_bin, ["produce", str(tmp_path / "cut.jsonl.gz")], cli_env)
    assert cut.returncode == 1, cut.stderr
    assert "cut.jsonl.gz: reading stopped after line" in cut.stderr and "truncated" in cut.stderr
    assert "Traceback" not in cut.stderr


def test_produce_missing_file_and_unreachable_kafka_are_clear_errors(
    tmp_path: Path, cli_env: dict[str, str], adreach_bin: str
) -> None:
    missing = run(adreach_bin, ["produce", str(tmp_path / "nope.jsonl")], cli_env)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    directory = run(adreach_bin, ["produce", str(tmp_path)], cli_env)
    assert directory.returncode == 2 and "is a directory" in directory.stderr
    # A file that exists but cannot be read (a read of this process's address 0 fails with EIO).
    unreadable = run(adreach_bin, ["produce", "/proc/self/mem"], cli_env)
    assert unreadable.returncode == 2 and "cannot read /proc/self/mem" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr
    env = {**cli_env, "ADREACH_BROKER__PORT": str(free_port())}
    (tmp_path / "one.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
    down = run(adreach_bin, ["produce", str(tmp_path / "one.jsonl")], env)
    assert down.returncode == 3
    assert "no Kafka broker answered" in down.stderr and "adreach broker start" in down.stderr
    assert "Connection refused" in down.stderr  # the client's own cause, not "Broker transport failure"


def test_stream_run_names_why_the_configured_cluster_is_unreachable(
    cli_env: dict[str, str], adreach_bin: str
) -> None:
    env = {**cli_env, "ADREACH_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    for command in (["stream", "run"], ["features", "queries"]):  # (consumers: they would wait forever)
        down = run(adreach_bin, [*command, "--until-idle", "1"], env)
        assert down.returncode == 3, (command, down.stderr)
        assert "no Kafka broker answered" in down.stderr and "Connection refused" in down.stderr
        assert "check kafka.bootstrap_servers" in down.stderr and "Traceback" not in down.stderr


def test_produce_refuses_a_json_array_file_with_the_command_that_converts_it(
    tmp_path: Path, cli_env: dict[str, str], adreach_bin: str
) -> None:
    # One JSON array (as many exports are): produced line by line, every line was rejected
    # and dead-lettered. Now nothing is sent and the message says how to convert it.
    pretty = "\ufeff\n  " + json.dumps(GOOD, indent=2)
    (tmp_path / "export.json").write_text(pretty)
    (tmp_path / "export.json.gz").write_bytes(gzip.compress(pretty.encode()))
    for name, convert in (("export.json", "jq -c '.[]' "), ("export.json.gz", "gunzip -c ")):
        refused = run(adreach_bin, ["produce", str(tmp_path / name)], cli_env)
        assert refused.returncode == 2, refused.stderr
        assert "looks like one JSON array" in refused.stderr and "Nothing was sent" in refused.stderr
        assert convert + str(tmp_path / name) in refused.stderr
    piped = run(adreach_bin, ["produce", "-"], cli_env, stdin=json.dumps(GOOD).encode())
    assert piped.returncode == 2 and "jq -c '.[]' | adreach produce -" in piped.stderr
    assert "sent" not in piped.stdout


def test_broker_commands(tmp_path: Path, cli_env: dict[str, str], adreach_bin: str) -> None:
    env = {**cli_env, "ADREACH_STATE_DIR": str(tmp_path), "ADREACH_BROKER__PORT": str(free_port())}
    assert run(adreach_bin, ["broker", "status"], env).returncode == 1
    started = run(adreach_bin, ["broker", "start"], env)
    try:
        assert started.returncode == 0, started.stderr
        assert "started" in started.stdout and "created topics" in started.stdout
        status = run(adreach_bin, ["broker", "status"], env)
        assert status.returncode == 0 and "is running" in status.stdout
        assert "already running" in run(adreach_bin, ["broker", "start"], env).stdout
    finally:
        stopped = run(adreach_bin, ["broker", "stop"], env)
    assert "stopped" in stopped.stdout
    assert run(adreach_bin, ["broker", "status"], env).returncode == 1


def test_config_file_and_environment_precedence(
    tmp_path: Path, cli_env: dict[str, str], adreach_bin: str
) -> None:
    port = free_port()
    (tmp_path / "adreach.toml").write_text(f"state_dir = '{tmp_path / 'state'}'\n[broker]\nport = {port}\n")
    env = {k: v for k, v in cli_env.items() if k not in {"ADREACH_STATE_DIR", "ADREACH_BROKER__PORT"}}
    status = run(adreach_bin, ["broker", "status"], env, cwd=tmp_path)
    assert f"127.0.0.1:{port}" in status.stdout, "./adreach.toml is read"
    status = run(adreach_bin, ["broker", "status"], {**env, "ADREACH_BROKER__PORT": "19999"}, cwd=tmp_path)
    assert "127.0.0.1:19999" in status.stdout, "environment overrides the file"
    bad = run(adreach_bin, ["--config", str(tmp_path / "missing.toml"), "broker", "status"], env)
    assert bad.returncode == 2 and "no such configuration file" in bad.stderr
    (tmp_path / "bad.toml").write_text("[broker]\nport = 'eighty'\n")
    invalid = run(adreach_bin, ["--config", str(tmp_path / "bad.toml"), "broker", "status"], env)
    assert invalid.returncode == 2 and "broker.port" in invalid.stderr
    # not TOML at all, or a variable that is not even parseable: a one-line error, no traceback
    (tmp_path / "broken.toml").write_text("[broker\nport = 1\n")
    broken = run(adreach_bin, ["--config", str(tmp_path / "broken.toml"), "broker", "status"], env)
    assert broken.returncode == 2 and "broken.toml: not valid TOML" in broken.stderr
    assert "Traceback" not in broken.stderr
    listed = run(
        adreach_bin, ["broker", "status"], {**env, "ADREACH_MODELS__PLACEMENTS": "feed,video"}, cwd=tmp_path
    )
    assert listed.returncode == 2 and "lists and tables are JSON" in listed.stderr
    assert "Traceback" not in listed.stderr


def test_schema_command_prints_the_published_schema(cli_env: dict[str, str], adreach_bin: str) -> None:
    result = run(adreach_bin, ["schema"], cli_env)
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert set(schema["discriminator"]["mapping"]) == {
        "impression",
        "click",
        "conversion",
        "search",
        "user_profile",
    }


def test_ctrl_c_reports_what_was_sent_and_exits_130(
    kafka: Settings, cli_env: dict[str, str], adreach_bin: str
) -> None:
    import signal
    import time

    process = subprocess.Popen(
        [adreach_bin, "produce", "-"],
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    for event in GOOD[:3]:
        process.stdin.write(json.dumps(event) + "\n")
    process.stdin.flush()
    # Interrupt only once the lines were read and produced (linger is milliseconds).
    assert len(consume(kafka, kafka.kafka.topics.events, expected=3)) == 3
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    # The signal races with end of input: it lands either in the read or in the final flush.
    assert "interrupted" in stderr and "sent 3 events" in stdout
    assert len(consume(kafka, kafka.kafka.topics.events, expected=3)) == 3, "nothing sent twice"


def test_progress_totals_count_plain_files_and_estimate_gzip_ones_without_a_second_pass(
    tmp_path: Path,
) -> None:
    import random

    from infra.compressed import open_binary
    from infra.progress import LineTotal

    rng = random.Random(3)  # random ids of varied length: lines that compress unevenly
    ids = [f"{rng.getrandbits(4 * rng.randint(1, 100)):x}" for _ in range(50_000)]
    text = "".join(json.dumps({**GOOD[0], "event_id": event_id}) + "\n" for event_id in ids)
    plain, packed = tmp_path / "events.jsonl", tmp_path / "events.jsonl.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))

    assert LineTotal(plain).total == 50_000
    gz = LineTotal(packed)
    assert gz.total is None  # not counted: that would decompress the file twice
    with open_binary(packed) as handle:
        assert gz.estimate(handle, 0) is None
        estimates = []
        for read, _ in enumerate(handle, start=1):
            if read % 10_000 == 0:
                estimates.append(gz.estimate(handle, read))
        final = gz.estimate(handle, read)
    assert final == 50_000  # at the end of the compressed bytes the estimate is the count
    # (the reader's read-ahead, 128 KB of the 1.9 MB here, puts early estimates a little low)
    assert all(e is not None and 42_500 <= e <= 57_500 for e in estimates), estimates


def test_help_paragraphs_are_reflowed_for_the_terminal_and_lists_keep_their_lines(
    cli_env: dict[str, str], adreach_bin: str
) -> None:
    from infra.help_text import reflow

    doc = """First line
    goes on.

    A paragraph wrapped
    at some width.
    - a list item
      continued
    1. numbered

    \b
    kept
    as is
    """
    assert reflow(doc) == (
        "First line goes on.\n\nA paragraph wrapped at some width.\n- a list item\n  continued\n1. numbered"
        "\n\n\b\nkept\nas is"
    )
    # Typer kept the breaks of a docstring's later paragraphs: at 80 columns every other
    # line of `stream run --help` was one word. Now the terminal wraps whole paragraphs.
    shown = run(adreach_bin, ["stream", "run", "--help"], {**cli_env, "COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    lines = [line.strip() for line in shown.stdout.splitlines()]
    assert "every" not in lines and "checkpointed)" not in lines
    assert any(line.startswith("Prints throughput, feature rows written") for line in lines)


def test_options_defaulting_to_a_setting_show_its_value(cli_env: dict[str, str], adreach_bin: str) -> None:
    """`--help` said "(default: reach.sample_rate)": where to change it, not what it is."""
    from infra.settings import ReachSettings, SimulationSettings  # (built-in values: no environment)

    shown = run(adreach_bin, ["reach", "build", "--help"], {**cli_env, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert f"(default: reach.sample_rate = {ReachSettings().sample_rate:g})" in shown.stdout
    shown = run(adreach_bin, ["simulate", "--help"], {**cli_env, "COLUMNS": "200"})
    assert f"(default: simulate.users = {SimulationSettings().users})" in shown.stdout


def test_the_readme_settings_example_is_valid_settings() -> None:
    """Users copy the README's adreach.toml: every key in it must exist, with a valid value
    (Settings forbids unknown keys)."""
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Settings") :]
    start = section.index("```toml") + len("```toml")
    example = tomllib.loads(section[start : section.index("```", start)])
    settings = Settings(**example)
    assert {"reach", "stream", "kafka", "quality"} <= set(example)
    assert settings.reach.fallback == example["reach"]["fallback"] and settings.broker.port == 19092
