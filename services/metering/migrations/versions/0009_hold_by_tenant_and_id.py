"""metering: a hold is found by (tenant, hold id) through one index, the only one that leads with tenant_id;
and a group of settlements probes it once per hold.

Every settle, renewal and explanation looks a hold up by tenant and id. While a table has no statistics
(a fresh database, bridge schema or silo database, until autovacuum analyzes it) the planner costs every
index that leads with tenant_id the same as that probe, and PL/pgSQL keeps the plan it made then for the
connection's life: measured, settles walked all of the tenant's holds through the tenant_id index (or,
without it, through the idempotency key or open-holds index by their tenant_id prefix), about 5x the
database's CPU per Reserve+Commit after a few thousand holds, and growing. So (tenant_id, hold_id) is now
the one index leading with tenant_id (it also serves the tenant-only look-ups the tenant_id index served);
the open-holds index leads with state and the key index with the key, which their look-ups fix anyway,
and a hold look-up can no longer use either. Each hold maintains as many indexes as before.

metering_settle_many took its holds in one UPDATE joined to the unnested ids, which the planner, again
without statistics, answered by scanning every hold of the tenant and joining. It now takes them one by
one, each exactly as metering_settle does, in hold id order so two groups that share holds lock them in
the same order; the counters move after, as before.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


# Same arguments, result and counter moves as 0008's; only the way the holds are taken differs.
_SETTLE_MANY = """
CREATE OR REPLACE FUNCTION metering_settle_many(
    p_tenant text, p_kind text, p_hold_ids text[], p_states text[], p_now bigint[],
    p_input bigint[], p_output bigint[], p_cache_write bigint[], p_cache_read bigint[], p_total bigint[])
RETURNS TABLE (o_hold_id text, o_tokens_held bigint, o_micros_held bigint, o_charged_tokens bigint,
    o_charged_micros bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_ids text[] := '{}';
    v_th bigint[] := '{}';
    v_mh bigint[] := '{}';
    v_tp bigint[] := '{}';
    v_mp bigint[] := '{}';
    v_ct bigint[] := '{}';
    v_cm bigint[] := '{}';
    v_hold record;
    v_s record;
    r record;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    FOR v_s IN
        SELECT * FROM unnest(p_hold_ids, p_states, p_now, p_input, p_output, p_cache_write, p_cache_read, p_total)
            AS s(hold_id, state, now_us, i, o, cw, cr, total)
        ORDER BY s.hold_id
    LOOP
        UPDATE metering_holds AS m SET state = v_s.state, settled_us = v_s.now_us, spent_input = v_s.i,
            spent_output = v_s.o, spent_cache_write = v_s.cw, spent_cache_read = v_s.cr, charged_tokens = v_s.total,
            charged_micros = (m.rate_input * v_s.i + m.rate_output * v_s.o + m.rate_cache_write * v_s.cw
                + m.rate_cache_read * v_s.cr + 999999) / 1000000
        WHERE m.tenant_id = p_tenant AND m.hold_id = v_s.hold_id AND m.kind = p_kind AND m.state || '' = 'open'
            AND m.tokens_held >= v_s.total
            AND m.micros_held >= (m.rate_input * v_s.i + m.rate_output * v_s.o + m.rate_cache_write * v_s.cw
                + m.rate_cache_read * v_s.cr + 999999) / 1000000
        RETURNING m.tokens_held, m.micros_held, m.tokens_period_us, m.micros_period_us, m.charged_tokens,
            m.charged_micros
        INTO v_hold;
        IF FOUND THEN
            v_ids := v_ids || v_s.hold_id;
            v_th := v_th || v_hold.tokens_held;
            v_mh := v_mh || v_hold.micros_held;
            v_tp := v_tp || v_hold.tokens_period_us;
            v_mp := v_mp || v_hold.micros_period_us;
            v_ct := v_ct || v_hold.charged_tokens;
            v_cm := v_cm || v_hold.charged_micros;
        END IF;
    END LOOP;
    FOR r IN
        SELECT x.unit, x.period, sum(x.rel) AS rel, sum(x.chg) AS chg
        FROM (SELECT 'tokens' AS unit, 0 AS ord, t.period, t.rel, t.chg
              FROM unnest(v_tp, v_th, v_ct) AS t(period, rel, chg)
              UNION ALL
              SELECT 'micro_usd', 1, t.period, t.rel, t.chg
              FROM unnest(v_mp, v_mh, v_cm) AS t(period, rel, chg)) AS x
        GROUP BY x.ord, x.unit, x.period ORDER BY x.ord, x.period
    LOOP
        IF r.unit = 'tokens' OR r.rel <> 0 OR r.chg <> 0 THEN
            UPDATE metering_budget_counters AS c SET held = c.held - r.rel, used = c.used + r.chg
            WHERE c.tenant_id = p_tenant AND c.unit = r.unit AND c.period_us = r.period;
        END IF;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(v_ids, v_th, v_mh, v_ct, v_cm);
END
$fn$"""


def _indexes(open_columns: list[str], key_columns: list[str]) -> None:
    """Rebuild the open-holds and idempotency key indexes on the given columns."""
    op.drop_index("ix_metering_holds_open", table_name="metering_holds")
    op.create_index("ix_metering_holds_open", "metering_holds", open_columns)
    op.drop_index("uq_metering_holds_key", table_name="metering_holds")
    op.create_index("uq_metering_holds_key", "metering_holds", key_columns, unique=True)


def upgrade() -> None:
    op.create_index("uq_metering_holds_tenant_hold", "metering_holds", ["tenant_id", "hold_id"], unique=True)
    op.drop_index("ix_metering_holds_tenant_id", table_name="metering_holds")
    _indexes(["state", "tenant_id", "expires_us"], ["idempotency_key", "tenant_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_SETTLE_MANY)


def downgrade() -> None:
    # metering_settle_many keeps taking holds one by one: the same outcome as 0008's join, on any indexes.
    _indexes(["tenant_id", "state", "expires_us"], ["tenant_id", "idempotency_key"])
    op.create_index("ix_metering_holds_tenant_id", "metering_holds", ["tenant_id"])
    op.drop_index("uq_metering_holds_tenant_hold", table_name="metering_holds")
