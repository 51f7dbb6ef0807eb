"""The audit queries behind the console's worklist and dashboard, on SQLite and
PostgreSQL: paging with a total, and counts per time bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db.models import Inference, Instance
from db.queries import InstanceFilter, count_instances, counts_over_time, list_instances
from db.session import init_db, session_scope


def _fill(url: str, now: datetime) -> None:
    with session_scope(url) as s:
        for k in range(7):
            inst = Instance(
                sop_instance_uid=f"1.2.826.0.1.{k}",
                content_sha256=f"{k:064d}",
                state="delivered" if k % 2 else "failed",
                calling_ae="MOD_A" if k < 4 else "MOD_B",
                received_at=now - timedelta(hours=k, minutes=30),
            )
            s.add(inst)
            s.flush()
            if k % 2:
                s.add(
                    Inference(
                        instance_id=inst.id,
                        model_version="2.0.0",
                        model_sha256="0" * 64,
                        p_covid=0.7 if k == 1 else 0.1,
                        p_normal=0.2,
                        p_other=0.1,
                        verdict="COVID" if k == 1 else "Normal",
                    )
                )


@pytest.mark.postgres
def test_paging_total_and_buckets(db_url: str) -> None:
    init_db(db_url)
    now = datetime.now(UTC).replace(microsecond=0)
    _fill(db_url, now)
    with session_scope(db_url) as s:
        page = list_instances(s, InstanceFilter(limit=3, offset=3))
        # newest (highest audit row id) first: rows 7..1 are k = 6..0
        assert [r.sop_instance_uid for r in page] == [f"1.2.826.0.1.{k}" for k in (3, 2, 1)]
        assert count_instances(s, InstanceFilter(limit=3, offset=3)) == 7
        assert count_instances(s, InstanceFilter(calling_aes=["MOD_B"])) == 3
        assert count_instances(s, InstanceFilter(verdicts=["covid"])) == 1
        buckets = counts_over_time(s, now - timedelta(hours=7), now, buckets=7)
        assert len(buckets) == 7
        # instance k was received k h 30 min ago: bucket 6 - k (oldest first)
        for k in range(7):
            b = buckets[6 - k]
            assert sum(b.per_state.values()) == 1, (k, b)
            want = "COVID" if k == 1 else ("Normal" if k % 2 else "-")
            assert b.per_verdict == {want: 1}
        only_failed = counts_over_time(
            s, now - timedelta(hours=7), now, buckets=1, flt=InstanceFilter(states=["failed"])
        )
        assert only_failed[0].per_state == {"failed": 4}
        with pytest.raises(ValueError):
            counts_over_time(s, now, now, buckets=3)
