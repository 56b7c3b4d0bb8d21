"""The Kafka client settings (docs/kafka.md): what is accepted, what is refused and named, what is never printed,
and the one librdkafka dict every client is built from."""

import re

import pytest
from confluent_kafka import KafkaError

from trainwire.infra.config import ConfigError, load_settings
from trainwire.infra.log.kafka_client import (admin_config, client_properties, consumer_config, describe,
                                              producer_config)

PASSWORD = "hunter2-Sup3rSecret"
CLIENT_SECRET = "oidc-Cl1entSecret"


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path))
    return monkeypatch


@pytest.fixture
def ca_file(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def scram(env, **extra):
    for name, value in {"KAFKA": "broker-1:9093", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "ingest",
                        "KAFKA_SASL_PASSWORD": PASSWORD, **extra}.items():
        if value is None:
            env.delenv(f"TRAINWIRE_{name}", raising=False)
        else:
            env.setenv(f"TRAINWIRE_{name}", value)


@pytest.mark.parametrize("bootstrap", [
    "broker-1", "broker-1:9092,broker-2:9092", "SASL_SSL://broker-1.example.com:9093,SASL_SSL://broker-2:9093",
    "ssl://10.0.0.7:9093", "[::1]:9092", "[fe80::1%eth0]:9092", "[2001:db8::7]", "broker-1:9092, broker-2:9092",
])
def test_what_librdkafka_takes_for_bootstrap_servers_is_accepted(env, bootstrap):
    env.setenv("TRAINWIRE_KAFKA", bootstrap)
    assert load_settings().kafka == bootstrap.replace(" ", "")


@pytest.mark.parametrize("bootstrap", [
    "not a bootstrap", "ftp://broker:21", "broker:0", "broker:65536", "broker-1:9092,,broker-2:9092", "::1:9092",
    "broker/path:9092", f"https://user:{PASSWORD}@broker:9092", f"sasl_ssl://user:{PASSWORD}@broker:9093",
])
def test_garbage_bootstrap_is_refused_in_one_line_naming_the_variable(env, bootstrap):
    env.setenv("TRAINWIRE_KAFKA", bootstrap)
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA:") as refused:
        load_settings()
    assert "\n" not in str(refused.value) and PASSWORD not in str(refused.value)


@pytest.mark.parametrize("change, says", [
    ({"KAFKA_SASL_MECHANISM": None}, "TRAINWIRE_KAFKA_SASL_MECHANISM: .*SASL_SSL needs a SASL mechanism"),
    ({"KAFKA_SASL_PASSWORD": None}, "TRAINWIRE_KAFKA_SASL_PASSWORD: .*SCRAM-SHA-512 needs a password"),
    ({"KAFKA_SASL_USERNAME": None}, "TRAINWIRE_KAFKA_SASL_USERNAME: .*needs a username"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL"}, "TRAINWIRE_KAFKA_SASL_MECHANISM: .*SECURITY_PROTOCOL is SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_TLS"}, "TRAINWIRE_KAFKA_SECURITY_PROTOCOL"),
    ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "TRAINWIRE_KAFKA_SASL_MECHANISM"),
    ({"KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.pem"}, "TRAINWIRE_KAFKA_SSL_CA_LOCATION: .*no such file"),
    ({"KAFKA_REPLICATION_FACTOR": "2", "KAFKA_MIN_INSYNC_REPLICAS": "3"}, "TRAINWIRE_KAFKA_MIN_INSYNC_REPLICAS"),
    ({"KAFKA_PARTITIONS": "0"}, "TRAINWIRE_KAFKA_PARTITIONS"),
    ({"KAFKA_RETENTION_HOURS": "inf"}, "TRAINWIRE_KAFKA_RETENTION_HOURS"),
])
def test_combinations_that_cannot_work_are_refused_at_start_naming_the_key(env, change, says):
    scram(env, **change)
    with pytest.raises(ConfigError, match=says) as refused:
        load_settings()
    assert PASSWORD not in str(refused.value) and "\n" not in str(refused.value)


def test_tls_files_need_a_tls_protocol_and_a_certificate_needs_its_key(env, ca_file):
    env.setenv("TRAINWIRE_KAFKA", "broker:9093")
    env.setenv("TRAINWIRE_KAFKA_SSL_CA_LOCATION", str(ca_file))
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_SSL_CA_LOCATION: .*PLAINTEXT, which uses no TLS"):
        load_settings()
    env.setenv("TRAINWIRE_KAFKA_SECURITY_PROTOCOL", "ssl")
    env.setenv("TRAINWIRE_KAFKA_SSL_CERTIFICATE_LOCATION", str(ca_file))
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_SSL_KEY_LOCATION: .*go together"):
        load_settings()
    env.setenv("TRAINWIRE_KAFKA_SSL_KEY_LOCATION", str(ca_file))
    env.setenv("TRAINWIRE_KAFKA_SSL_KEY_PASSWORD", PASSWORD)
    properties = client_properties(load_settings())
    assert properties["security.protocol"] == "SSL" and properties["ssl.key.password"] == PASSWORD
    assert properties["ssl.ca.location"] == properties["ssl.key.location"] == str(ca_file)


@pytest.mark.parametrize("key, says", [
    ("enable.auto.commit", "only once a batch is stored"), ("group.id", "names its consumer groups"),
    ("enable.idempotence", "idempotent"), ("acks", "acks=all"), ("bootstrap.servers", "TRAINWIRE_KAFKA "),
    ("sasl.password", "TRAINWIRE_KAFKA_SASL_PASSWORD"), ("security.protocol", "TRAINWIRE_KAFKA_SECURITY_PROTOCOL"),
    ("Client.ID", "not a librdkafka property name"),
])
def test_pass_through_keys_trainwire_owns_are_refused_naming_the_key(env, key, says):
    env.setenv("TRAINWIRE_KAFKA_CLIENT", f'{{"{key}": "{PASSWORD}"}}')
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_CLIENT: ") as refused:
        load_settings()
    assert key in str(refused.value) and says in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_a_pass_through_variable_that_is_no_json_object_is_named(env):
    env.setenv("TRAINWIRE_KAFKA_CLIENT", "client.id=x")
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_CLIENT: not valid JSON"):
        load_settings()
    env.setenv("TRAINWIRE_KAFKA_CLIENT", '["client.id"]')
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_CLIENT: .*table of librdkafka properties"):
        load_settings()


def test_secrets_are_never_in_repr_str_or_a_dump_but_reach_librdkafka(env):
    scram(env, KAFKA_CLIENT=f'{{"sasl.oauthbearer.client.secret": "{CLIENT_SECRET}", "client.id": "tw"}}')
    settings = load_settings()
    for shown in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert PASSWORD not in shown and CLIENT_SECRET not in shown
    properties = client_properties(settings)
    assert properties["sasl.password"] == PASSWORD
    assert properties["sasl.oauthbearer.client.secret"] == CLIENT_SECRET and properties["client.id"] == "tw"
    assert hash(settings) == hash(load_settings()), "one SDK sender per settings: they must hash"


def test_an_invalid_setting_beside_a_password_does_not_show_the_password(env):
    scram(env, KAFKA_PARTITIONS="many")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "TRAINWIRE_KAFKA_PARTITIONS" in str(refused.value) and PASSWORD not in str(refused.value)


def test_every_client_is_built_from_the_same_properties_and_trainwire_keeps_its_own(env):
    scram(env, KAFKA_CLIENT='{"client.id": "tw-probe", "linger.ms": 50, "socket.keepalive.enable": true}')
    settings = load_settings()
    shared = client_properties(settings)
    built = {"producer": producer_config(settings), "consumer": consumer_config(settings, "g", "i-1"),
             "admin": admin_config(settings)}
    for name, config in built.items():
        assert {k: config[k] for k in shared} == shared, name
        assert config["error_cb"] is not None and config["logger"].name == "trainwire.librdkafka", name
    assert built["producer"]["linger.ms"] == 50, "a pass-through value overrides trainwire's tuning"
    assert built["producer"]["enable.idempotence"] is True and built["producer"]["acks"] == "all"
    consumer = built["consumer"]
    assert consumer["group.id"] == "g" and consumer["group.instance.id"] == "i-1"
    assert consumer["enable.auto.commit"] is False and consumer["enable.auto.offset.store"] is False


def write_config(tmp_path, env, text: str):
    config = tmp_path / "trainwire.toml"
    config.write_text(text)
    env.setenv("TRAINWIRE_CONFIG", str(config))
    return config


def test_the_kafka_table_of_the_config_file(env, tmp_path, ca_file):
    write_config(tmp_path, env, f"""
team = "nlp"
[kafka]
bootstrap = "SASL_SSL://broker-1:9093,SASL_SSL://broker-2:9093"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-256"
sasl_username = "producer"
sasl_password = "{PASSWORD}"
ssl_ca_location = "{ca_file}"
partitions = 12
replication_factor = 3
retention_hours = 72
[kafka.client]
"client.id" = "trainer-7"
"sasl.oauthbearer.client.secret" = "{CLIENT_SECRET}"
""")
    settings = load_settings()
    assert settings.kafka == "SASL_SSL://broker-1:9093,SASL_SSL://broker-2:9093" and settings.team == "nlp"
    assert (settings.kafka_partitions, settings.kafka_replication_factor, settings.kafka_retention_hours) == (12, 3, 72)
    properties = client_properties(settings)
    assert properties["sasl.mechanism"] == "SCRAM-SHA-256" and properties["sasl.username"] == "producer"
    assert properties["sasl.password"] == PASSWORD and properties["ssl.ca.location"] == str(ca_file)
    assert properties["client.id"] == "trainer-7" and properties["sasl.oauthbearer.client.secret"] == CLIENT_SECRET
    assert PASSWORD not in repr(settings) and CLIENT_SECRET not in repr(settings)
    env.setenv("TRAINWIRE_KAFKA_SASL_USERNAME", "other")
    assert load_settings().kafka_sasl_username == "other", "the environment wins over the file"


@pytest.mark.parametrize("table, says", [
    ('security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "u"\n', "kafka.sasl_password (in "),
    ('bootstrap = "a b"\n', "kafka.bootstrap (in "),
    ('sasl_pasword = "x"\n', "kafka.sasl_pasword (in "),
    ('[kafka.client]\n"group.id" = "mine"\n', "kafka.client (in "),
    ('partitions = -1\n', "kafka.partitions (in "),
])
def test_a_bad_kafka_table_names_the_key_and_the_file(env, tmp_path, table, says):
    config = write_config(tmp_path, env, f"[kafka]\nbootstrap = \"b:9092\"\n{table}".replace(
        'bootstrap = "b:9092"\nbootstrap', "bootstrap"))
    with pytest.raises(ConfigError, match=re.escape(says)) as refused:
        load_settings()
    assert str(config) in str(refused.value) and PASSWORD not in str(refused.value)


def test_a_key_set_both_flat_and_in_the_kafka_table_is_refused(env, tmp_path):
    write_config(tmp_path, env, 'kafka_partitions = 4\n[kafka]\npartitions = 6\n')
    with pytest.raises(ConfigError, match="kafka.partitions and kafka_partitions are both set"):
        load_settings()


@pytest.mark.parametrize("code, text, says", [
    (KafkaError._AUTHENTICATION, "sasl_ssl://broker-1:9093/bootstrap: SASL authentication error: Authentication "
     "failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 3ms in state "
     "AUTH_REQ)", "authentication failed for user ingest with SCRAM-SHA-512: check TRAINWIRE_KAFKA_SASL_USERNAME/"
     "PASSWORD"),
    (KafkaError._SSL, "ssl://broker-1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate "
     "verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured "
     "(after 5ms in state SSL_HANDSHAKE)", "TLS handshake with broker-1:9093 failed: certificate verify failed: "
     "check TRAINWIRE_KAFKA_SSL_CA_LOCATION"),
    (KafkaError._TRANSPORT, "sasl_ssl://127.0.0.1:9092/bootstrap: SSL handshake failed: Disconnected: SSL connection "
     "closed by peer: connecting to a PLAINTEXT broker listener? (after 2ms in state SSL_HANDSHAKE)",
     "TLS handshake with 127.0.0.1:9092 failed: the listener does not speak TLS"),
    (KafkaError._AUTHENTICATION, "sasl_plaintext://127.0.0.1:9092/bootstrap: SASL SCRAM-SHA-512 mechanism handshake "
     "failed: Broker: Request not valid in current SASL state: broker's supported mechanisms:  (after 0ms in state "
     "AUTH_HANDSHAKE)", "127.0.0.1:9092 does not offer SASL SCRAM-SHA-512"),
    (KafkaError._TRANSPORT, "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms "
     "in state CONNECT)", "cannot reach 127.0.0.1:1 (Connect to ipv4#127.0.0.1:1 failed: Connection refused): check "
     "TRAINWIRE_KAFKA"),
])
def test_librdkafka_errors_become_one_line_naming_what_to_check(env, code, text, says):
    scram(env)
    line = describe(KafkaError(code, text), load_settings())
    assert says in line and "\n" not in line and PASSWORD not in line


def metadata_of(replicas_by_topic: dict[str, list[int]]):
    """Cluster metadata as librdkafka returns it: per topic, the replica count of each partition."""
    from confluent_kafka.admin import ClusterMetadata, PartitionMetadata, TopicMetadata

    metadata = ClusterMetadata()
    for topic, counts in replicas_by_topic.items():
        metadata.topics[topic] = TopicMetadata()
        for index, count in enumerate(counts):
            partition = PartitionMetadata()
            partition.replicas = list(range(count))
            metadata.topics[topic].partitions[index] = partition
    return metadata


def test_existing_topics_with_fewer_replicas_than_wanted_are_said_once_in_one_line(caplog):
    from trainwire.infra.log.kafka_admin import _warn_under_replicated

    metadata = metadata_of({"t.events": [3, 1, 3], "t.gpu": [3, 3], "t.alerts": [2, 2]})
    with caplog.at_level("WARNING", logger="trainwire"):
        _warn_under_replicated(metadata, ["t.alerts", "t.events", "t.gpu"], 3)
        _warn_under_replicated(metadata, ["t.alerts", "t.events", "t.gpu"], 3)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "t.alerts (2), t.events (1)" in line and "t.gpu" not in line and "\n" not in line


@pytest.mark.parametrize("configured, insync, brokers, expected", [
    (None, None, 1, (1, 1)), (None, None, 2, (2, 2)), (None, None, 5, (3, 2)), (2, None, 5, (2, 2)),
    (3, 3, 3, (3, 3)), (1, None, 3, (1, 1)),
])
def test_replication_defaults_follow_the_broker_count(env, configured, insync, brokers, expected):
    from trainwire.infra.log.kafka_admin import replication_for

    settings = load_settings(kafka="b:9092", kafka_replication_factor=configured, kafka_min_insync_replicas=insync)
    assert replication_for(settings, brokers) == expected


def test_min_insync_above_the_default_replication_is_refused_naming_it(env):
    from trainwire.infra.log.kafka_admin import replication_for

    settings = load_settings(kafka="b:9092", kafka_min_insync_replicas=2)
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_MIN_INSYNC_REPLICAS is 2 but topics get 1 replica"):
        replication_for(settings, 1)
