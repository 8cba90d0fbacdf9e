"""Attacks on today's code: LeanSimpleWorker.take_next_job, job._ClaimWithObject, models.CompiledGet.

Each test pins behaviour that holds (three defects it found were fixed: a job hash without data,
job data that does not deserialize, and an object id beyond 64 bits on SQLite).
"""

from __future__ import annotations

import contextlib
from typing import Any

import django_rq
import pytest
import redis
from django.contrib.contenttypes.models import ContentType
from django.db import connection, models

from asyncmodels import dispatch, job
from asyncmodels.models import CallState, CompiledGet, MethodCall
from asyncmodels.worker import LeanSimpleWorker
from testproject.cloud.models import Account, Echo, Instance, Region, Volume

POSTGRESQL = connection.vendor == "postgresql"
DB = pytest.mark.django_db(transaction=True, databases=["default", "other"])


class InstanceProxy(Instance):
    class Meta:
        proxy = True
        app_label = "cloud"


def _state(call: MethodCall) -> str:
    call.refresh_from_db()
    return str(call.state)


def _instance(name: str = "web1") -> Instance:
    return Instance.objects.create(account=Account.objects.create(name="acme"), name=name)


def _worker(connection_: redis.Redis, *names: str) -> LeanSimpleWorker:
    queues = [django_rq.get_queue(name, commit_mode="auto") for name in names or ("default",)]
    return LeanSimpleWorker(queues, connection=connection_)


def _leftovers(connection_: redis.Redis) -> list[str]:
    keys = [_text(k) for k in connection_.keys("rq:job:*")]
    intermediate = connection_.lrange(dispatch.get_queue("default").key + ":intermediate", 0, -1)
    return keys + [f"intermediate: {_text(j)}" for j in intermediate]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
def fresh_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job, "_LAST_MODEL", {})
    monkeypatch.setattr(job, "_CLAIM_WITH_OBJECT", job._ClaimWithObject())
    monkeypatch.setattr(job, "_OBJECTS", CompiledGet())


def _forge(call: MethodCall, **changes: Any) -> MethodCall:
    MethodCall.objects.filter(pk=call.pk).update(**changes)
    call.refresh_from_db()
    return call


def _run(call: MethodCall) -> MethodCall:
    job.run_method_call(call.pk, "default")
    call.refresh_from_db()
    return call


# --- 1. LeanSimpleWorker.take_next_job ------------------------------------------------------------


@DB
@pytest.mark.live_redis
def test_max_jobs_stops_after_n_and_sends_the_last_bookkeeping(redis_connection: redis.Redis) -> None:
    echo = Echo.objects.create()
    calls = [echo.bump() for _ in range(3)]
    worker = _worker(redis_connection)
    worker.work(burst=True, max_jobs=2)
    assert [_state(c) for c in calls] == [CallState.SUCCEEDED, CallState.SUCCEEDED, CallState.ENQUEUED]
    assert int(redis_connection.hget(worker.key, "successful_job_count") or 0) == 2
    queue = dispatch.get_queue("default")
    assert redis_connection.llen(queue.key) == 1  # the third still waits
    assert redis_connection.llen(queue.key + ":intermediate") == 0
    assert [k for k in _leftovers(redis_connection) if not k.startswith("rq:job:")] == []


@DB
@pytest.mark.live_redis
def test_other_functions_mixed_in_between_calls(redis_connection: redis.Redis) -> None:
    queue = django_rq.get_queue("default", commit_mode="auto")
    echo = Echo.objects.create()
    first = echo.bump()
    other = queue.enqueue("testproject.cloud.bench_jobs.noop", result_ttl=0)
    failing = queue.enqueue("builtins.int", "not a number", result_ttl=0)
    second = echo.bump()
    worker = _worker(redis_connection)
    worker.work(burst=True)
    assert [_state(c) for c in (first, second)] == [CallState.SUCCEEDED] * 2
    assert int(redis_connection.hget(worker.key, "successful_job_count") or 0) == 3
    assert int(redis_connection.hget(worker.key, "failed_job_count") or 0) == 1
    assert redis_connection.llen(queue.key + ":intermediate") == 0
    assert other.id and failing.id


@DB
@pytest.mark.live_redis
def test_flushed_redis_between_calls_loses_no_call(redis_connection: redis.Redis) -> None:
    echo = Echo.objects.create()
    first = echo.bump()
    worker = _worker(redis_connection)
    worker.work(burst=True, max_jobs=1)
    redis_connection.flushdb()  # Redis lost: the second call's push is gone with it
    second = echo.bump()
    worker = _worker(redis_connection)
    worker.work(burst=True)
    assert [_state(c) for c in (first, second)] == [CallState.SUCCEEDED] * 2
    assert _leftovers(redis_connection) == []


@DB
@pytest.mark.live_redis
def test_pending_bookkeeping_survives_a_flush_without_harm(redis_connection: redis.Redis) -> None:
    """The last call's bookkeeping is pending when Redis is flushed; the next take sends it."""
    echo = Echo.objects.create()
    first = echo.bump()
    worker = _worker(redis_connection)
    worker.bootstrap()  # registers the worker
    taken = worker.take_next_job()
    assert taken is not None
    worker.execute_job(*taken)
    assert worker._bookkeeping is not None
    redis_connection.flushdb()
    second = echo.bump()
    taken = worker.take_next_job()  # sends the stale bookkeeping, takes the second job
    assert taken is not None
    worker.execute_job(*taken)
    worker.teardown()
    assert [_state(c) for c in (first, second)] == [CallState.SUCCEEDED] * 2
    assert _leftovers(redis_connection) == []


@DB
@pytest.mark.live_redis
def test_a_job_hash_without_data_is_passed_over(redis_connection: redis.Redis) -> None:
    call = Echo.objects.create().bump()
    queue = django_rq.get_queue("default", commit_mode="auto")
    redis_connection.hset("rq:job:half-gone", "status", "queued")  # a hash left with one field
    redis_connection.lpush(queue.key, "half-gone")
    _worker(redis_connection).work(burst=True)
    assert _state(call) == CallState.SUCCEEDED


@DB
@pytest.mark.live_redis
def test_rqs_own_simpleworker_passes_over_a_job_hash_without_data(redis_connection: redis.Redis) -> None:
    """The reference behaviour for the test above: RQ's own pop passes over the same job."""
    from rq import SimpleWorker

    call = Echo.objects.create().bump()
    queue = django_rq.get_queue("default", commit_mode="auto")
    redis_connection.hset("rq:job:half-gone", "status", "queued")
    redis_connection.lpush(queue.key, "half-gone")
    SimpleWorker([queue], connection=redis_connection).work(burst=True)
    assert _state(call) == CallState.SUCCEEDED


@DB
@pytest.mark.live_redis
def test_a_job_whose_data_does_not_deserialize_does_not_stop_the_worker(
    redis_connection: redis.Redis,
) -> None:
    call = Echo.objects.create().bump()
    queue = django_rq.get_queue("default", commit_mode="auto")
    redis_connection.hset(
        "rq:job:garbage", mapping={"data": b"\x00not a pickle", "origin": "default", "status": "queued"}
    )
    redis_connection.lpush(queue.key, "garbage")
    _worker(redis_connection).work(burst=True)
    assert _state(call) == CallState.SUCCEEDED


@DB
@pytest.mark.live_redis
def test_rqs_own_simpleworker_survives_a_job_whose_data_does_not_deserialize(
    redis_connection: redis.Redis,
) -> None:
    from rq import SimpleWorker

    call = Echo.objects.create().bump()
    queue = django_rq.get_queue("default", commit_mode="auto")
    redis_connection.hset(
        "rq:job:garbage", mapping={"data": b"\x00not a pickle", "origin": "default", "status": "queued"}
    )
    redis_connection.lpush(queue.key, "garbage")
    SimpleWorker([queue], connection=redis_connection).work(burst=True)
    assert _state(call) == CallState.SUCCEEDED


# --- 2. _ClaimWithObject and 3. CompiledGet -----------------------------------------------------

DOCUMENTED = {"asyncmodels.InvalidObjectId", "asyncmodels.ObjectDoesNotExist"}


@DB
@pytest.mark.usefixtures("fresh_guess")
@pytest.mark.parametrize(
    "object_id",
    [
        "abc",
        "",
        "007",
        "-1",
        " 1",
        "1 ",
        "1.0",
        "\u0667",
        "1_0",
        "+1",
        "0x1",
        "1\n",
        "-0",
        "999999999999999999",
    ],
)
def test_forged_integer_object_ids_fail_as_documented(object_id: str) -> None:
    warm, target = _instance("warm"), _instance("target")
    assert _run(warm.describe()).state == CallState.SUCCEEDED  # guess: Instance
    call = _forge(target.describe(), object_id=object_id)
    _run(call)
    assert call.state == CallState.FAILED
    assert call.error_type in DOCUMENTED, (call.error_type, call.error)


@DB
@pytest.mark.usefixtures("fresh_guess")
@pytest.mark.skipif(POSTGRESQL, reason="PostgreSQL compares the numeric value and finds no row")
def test_an_integer_object_id_beyond_64_bits_fails_as_object_does_not_exist() -> None:
    warm, target = _instance("warm"), _instance("target")
    _run(warm.describe())
    call = _forge(target.describe(), object_id="99999999999999999999")
    _run(call)
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ObjectDoesNotExist")


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_an_integer_object_id_beyond_64_bits_fails_on_postgresql() -> None:
    if not POSTGRESQL:
        pytest.skip("SQLite: see the test above")
    warm, target = _instance("warm"), _instance("target")
    _run(warm.describe())
    for object_id in ("99999999999999999999", "-99999999999999999999", "9223372036854775808"):
        call = _forge(target.describe(), object_id=object_id)
        _run(call)
        assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ObjectDoesNotExist")


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_forged_uuid_object_ids_never_load_a_wrong_object() -> None:
    instance = _instance()
    warm, volume = Volume.objects.create(), Volume.objects.create()
    assert _run(warm.attach(instance)).state == CallState.SUCCEEDED  # guess: Volume
    good = str(volume.pk)
    forms = [
        good.upper(),
        good.replace("-", ""),
        "{" + good + "}",
        "urn:uuid:" + good,
        good[:8] + good[9:13] + "-" + good[14:],
        "zz" + good[2:],
        good + "0",
        "",
        "1",
    ]
    for object_id in forms:
        call = _forge(volume.attach(instance), object_id=object_id)
        _run(call)
        assert call.state == CallState.FAILED, object_id
        assert call.error_type in DOCUMENTED, (object_id, call.error_type, call.error)
    ok = _run(volume.attach(instance))
    assert ok.state == CallState.SUCCEEDED


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_forged_char_object_ids() -> None:
    warm, region = Region.objects.create(code="eu-1"), Region.objects.create(code="us-1")
    assert _run(warm.ping()).state == CallState.SUCCEEDED  # guess: Region
    for object_id in ("EU-1", "eu-1 ", "%", "eu-%", "'; drop table x; --", "é" * 100):
        call = _forge(region.ping(), object_id=object_id)
        _run(call)
        assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ObjectDoesNotExist"), (
            object_id
        )
    assert _run(region.ping()).result == _run(Region.objects.get(pk="us-1").ping()).result


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_content_type_of_another_model_with_a_valid_id_of_it() -> None:
    warm, target = _instance("warm"), _instance("target")
    echo = Echo.objects.create()
    _run(warm.describe())  # guess: Instance
    call = _forge(
        target.describe(),
        content_type=ContentType.objects.get_for_model(Echo),
        object_id=str(echo.pk),
    )
    _run(call)
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ContentTypeMismatch")
    # The method of Echo forged onto an Instance's content type and id: refused too, nothing loaded.
    call = _forge(
        echo.bump(), content_type=ContentType.objects.get_for_model(Instance), object_id=str(target.pk)
    )
    _run(call)
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ContentTypeMismatch")
    echo.refresh_from_db()
    assert echo.hits == 0


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_deleted_object_then_next_call_loads_the_right_object() -> None:
    warm, gone, kept = _instance("warm"), _instance("gone"), _instance("kept")
    _run(warm.describe())
    call = gone.describe()
    Instance.objects.filter(pk=gone.pk).delete()
    _run(call)
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ObjectDoesNotExist")
    ok = _run(kept.describe())
    assert ok.result == {"name": "kept", "size": "small", "status": "new"}


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_base_manager_that_filters_rows_is_honoured_with_the_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    class Visible(models.Manager["Instance"]):
        def get_queryset(self) -> models.QuerySet[Instance]:
            return super().get_queryset().exclude(status="hidden")

    manager = Visible()
    manager.model = Instance
    manager.name = "visible"
    monkeypatch.setattr(Instance._meta, "base_manager", manager)
    warm, hidden = _instance("warm"), _instance("hidden")
    assert _run(warm.describe()).state == CallState.SUCCEEDED  # guess: Instance
    Instance.objects.filter(pk=hidden.pk).update(status="hidden")
    call = _run(hidden.describe())
    assert (call.state, call.error_type) == (CallState.FAILED, "asyncmodels.ObjectDoesNotExist")


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_a_call_whose_row_names_a_proxy_loaded_as_the_concrete_model() -> None:
    first, second = _instance("one"), _instance("two")
    _run(first.describe())
    got = CompiledGet().get(InstanceProxy, "default", str(second.pk))
    assert type(got) is InstanceProxy and got.name == "two" and got.account_id == second.account_id
    again = CompiledGet().get(Instance, "default", second.pk)
    assert type(again) is Instance


@DB
def test_compiled_get_with_a_custom_base_manager_name(monkeypatch: pytest.MonkeyPatch) -> None:
    class Only(models.Manager["Instance"]):
        def get_queryset(self) -> models.QuerySet[Instance]:
            return super().get_queryset().filter(name__startswith="ok")

    manager = Only()
    manager.model = Instance
    manager.name = "only"
    monkeypatch.setattr(Instance._meta, "base_manager", manager)
    ok, no = _instance("ok-1"), _instance("no-1")
    getter = CompiledGet()
    assert getter.get(Instance, "default", ok.pk).name == "ok-1"
    with pytest.raises(Instance.DoesNotExist):
        getter.get(Instance, "default", no.pk)


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_task_calls_right_after_a_method_call_and_a_forged_task_row() -> None:
    pytest.importorskip("asyncmodels.backends.tasks")
    try:
        from testproject.cloud import tasks as cloud_tasks
    except ImportError:
        pytest.skip("no tasks framework")
    target = _instance("target")
    _run(_instance("warm").describe())  # guess: Instance
    cloud_tasks.add.enqueue(1, 2)
    call = MethodCall.objects.latest("pk")
    assert _run(call).state == CallState.SUCCEEDED and call.return_value == 3
    # A task row cannot be forged to point at an object: the table's check refuses it.
    from django.db import IntegrityError

    cloud_tasks.add.enqueue(2, 3)
    with pytest.raises(IntegrityError):
        _forge(
            MethodCall.objects.latest("pk"),
            content_type=ContentType.objects.get_for_model(Instance),
            object_id=str(target.pk),
        )
    assert _run(target.describe()).result == {"name": "target", "size": "small", "status": "new"}


@DB
@pytest.mark.usefixtures("fresh_guess")
def test_many_forged_ids_in_a_row_on_one_connection() -> None:
    """More than prepare_threshold (5) claims on one connection: a prepared/generic plan too."""
    warm, target = _instance("warm"), _instance("target")
    _run(warm.describe())
    for object_id in ["x", "1e3", "-", "--1", "1-", "\u0661", "0" * 19, "9" * 18, "", " ", "NaN", "1;"] * 2:
        call = _forge(target.describe(), object_id=object_id)
        _run(call)
        assert call.state == CallState.FAILED and call.error_type in DOCUMENTED, (object_id, call.error)
    assert _run(target.describe()).result == {"name": "target", "size": "small", "status": "new"}


@DB
@pytest.mark.live_redis
def test_worker_killed_right_after_a_call_leaves_its_job_to_rqs_cleanup_and_never_reruns(
    redis_connection: redis.Redis,
) -> None:
    """kill -9 after a call and before the next take: its bookkeeping is lost. The job id stays in
    the intermediate list until RQ's cleanup fails it (a minute after first seen); requeued
    from RQ's failed registry, the call does not run again."""
    from datetime import timedelta

    from rq.intermediate_queue import IntermediateQueue
    from rq.utils import now

    echo = Echo.objects.create()
    call = echo.bump()
    worker = _worker(redis_connection)
    worker.bootstrap()
    taken = worker.take_next_job()
    assert taken is not None
    worker.execute_job(*taken)  # then "kill -9": no teardown, no next take
    assert _state(call) == CallState.SUCCEEDED
    queue = dispatch.get_queue("default")
    intermediate = IntermediateQueue(queue.key, redis_connection)
    assert intermediate.get_job_ids() == [taken[0].id]
    survivor = _worker(redis_connection)
    intermediate.cleanup(survivor, queue)  # first seen
    redis_connection.set(
        intermediate.get_first_seen_key(taken[0].id), (now() - timedelta(minutes=2)).timestamp()
    )
    intermediate.cleanup(survivor, queue)  # failed now
    assert intermediate.get_job_ids() == []
    assert taken[0].id in queue.failed_job_registry.get_job_ids()
    queue.failed_job_registry.requeue(taken[0].id)
    _worker(redis_connection).work(burst=True)  # a fresh worker runs the requeued job
    call.refresh_from_db()
    echo.refresh_from_db()
    assert (call.state, call.attempts, echo.hits) == (CallState.SUCCEEDED, 1, 1)
    assert redis_connection.llen(queue.key + ":intermediate") == 0


@DB
@pytest.mark.live_redis
def test_sigterm_while_idle_sends_the_last_bookkeeping(
    spawn_worker: Any, redis_connection: redis.Redis
) -> None:
    import signal

    from .conftest import wait_for

    echo = Echo.objects.create()
    calls = [echo.bump() for _ in range(3)]
    worker = spawn_worker("default", worker_class="asyncmodels.worker.LeanSimpleWorker")
    wait_for(lambda: all(_state(c) == CallState.SUCCEEDED for c in calls), message="the calls")
    names = {c.worker for c in calls}
    assert len(names) == 1
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    stats = redis_connection.hgetall(f"rq:worker:{names.pop()}")
    assert int(stats[b"successful_job_count"]) == 3
    assert _leftovers(redis_connection) == []


@DB
@pytest.mark.live_redis
def test_max_jobs_real_process(run_worker: Any, redis_connection: redis.Redis) -> None:
    import subprocess
    import sys

    from .conftest import REPO, _worker_env

    echo = Echo.objects.create()
    calls = [echo.bump() for _ in range(3)]
    completed = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "rqworker",
            "--burst",
            "--max-jobs",
            "2",
            "--worker-class",
            "asyncmodels.worker.LeanSimpleWorker",
            "default",
        ],
        cwd=REPO,
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert [_state(c) for c in calls].count(CallState.SUCCEEDED) == 2
    queue = dispatch.get_queue("default")
    assert redis_connection.llen(queue.key + ":intermediate") == 0
    assert redis_connection.llen(queue.key) == 1


@DB
@pytest.mark.skipif(POSTGRESQL, reason="SQLite only")
def test_an_integer_object_id_beyond_64_bits_leaves_no_running_call() -> None:
    target = _instance("target")
    call = _forge(target.describe(), object_id="-99999999999999999999")
    with contextlib.suppress(OverflowError):
        job.run_method_call(call.pk, "default")
    assert _state(call) != CallState.RUNNING


@DB
@pytest.mark.skipif(POSTGRESQL, reason="SQLite only")
def test_djangos_own_get_says_does_not_exist_for_the_same_id() -> None:
    with pytest.raises(Instance.DoesNotExist):
        Instance._base_manager.get(pk="99999999999999999999")


def test_compiled_select_of_a_multi_table_child_loads_parent_and_child_columns() -> None:
    from django.test.utils import isolate_apps

    from asyncmodels.models import CompiledSelect

    with isolate_apps("testproject.cloud"):

        class SpecialInstance(Instance):
            extra = models.CharField(max_length=10, db_column="extra_col")

            class Meta:
                app_label = "cloud"

        select = CompiledSelect.of(SpecialInstance, "default")
    if select is None:
        return  # get() is used: fine
    assert "JOIN" in select.sql and "extra_col" in select.sql
    assert "instance_ptr_id" in select.names and "extra" in select.names and "name" in select.names
    assert len(select.names) == len(set(select.names))


@DB
def test_compiled_get_of_a_multi_table_child_matches_get() -> None:
    from django.db import connection as default_connection
    from django.test.utils import isolate_apps

    from asyncmodels.models import CompiledSelect

    with isolate_apps("testproject.cloud"):

        class SpecialInstance(Instance):
            extra = models.CharField(max_length=10, db_column="extra_col")

            class Meta:
                app_label = "cloud"
                db_table = "brk_special_instance"

        assert CompiledSelect.of(SpecialInstance, "default") is not None
        with default_connection.schema_editor() as editor:
            editor.create_model(SpecialInstance)
        try:
            account = Account.objects.create(name="acme")
            special = SpecialInstance.objects.create(account=account, name="sp", extra="x")
            _instance("plain")
            got = CompiledGet().get(SpecialInstance, "default", str(special.pk))
            expected = SpecialInstance._base_manager.get(pk=special.pk)
            assert type(got) is SpecialInstance
            assert [getattr(got, f.attname) for f in SpecialInstance._meta.concrete_fields] == [
                getattr(expected, f.attname) for f in SpecialInstance._meta.concrete_fields
            ]
            with pytest.raises(SpecialInstance.DoesNotExist):
                CompiledGet().get(SpecialInstance, "default", Instance.objects.get(name="plain").pk)
        finally:
            with default_connection.schema_editor() as editor:
                editor.delete_model(SpecialInstance)


@DB
@pytest.mark.live_redis
def test_a_passed_over_job_id_leaves_the_intermediate_list_at_rqs_next_cleanup(
    redis_connection: redis.Redis,
) -> None:
    from rq.intermediate_queue import IntermediateQueue

    call = Echo.objects.create().bump()
    queue = dispatch.get_queue("default")
    redis_connection.lpush(queue.key, "no-hash")
    worker = _worker(redis_connection)
    worker.work(burst=True)
    assert _state(call) == CallState.SUCCEEDED
    intermediate = IntermediateQueue(queue.key, redis_connection)
    # Left behind by the take, as by RQ's own LMOVE; not forever: RQ's cleanup drops a hashless id.
    assert intermediate.get_job_ids() in ([], ["no-hash"])
    intermediate.cleanup(worker, queue)
    assert intermediate.get_job_ids() == []
