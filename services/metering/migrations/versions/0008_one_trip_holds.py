"""metering (Postgres): a reservation and a settlement in one round trip each.

Two PL/pgSQL functions that do what budget_sql's placing and settling statements do, after setting
`app.tenant_id` for the rest of the calling transaction. The service calls them outside any
explicit transaction, so each call is one implicit transaction: atomic, and the tenant setting
ends with it. They are SECURITY INVOKER (run as the runtime role, so row-level security confines
every row they touch exactly as in db.raw()) and pin their search_path to the schema they were
created in (the bridge tier's own schema, or public). No-ops on SQLite, which keeps the statements.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# A hold: move the tokens counter, then the micro_usd counter (the lock order), each only within its
# hard limit, and insert the hold flagged when a counter passed its soft limit. A keyed reservation
# that exists already is returned instead (o_existing set). A refused counter raises, which rolls
# the whole call back (an earlier counter may have moved): SQLSTATE P0001, message
# 'metering: over budget', detail the refused unit.
_RESERVE = """
CREATE FUNCTION metering_reserve(
    p_tenant text, p_tok_period bigint, p_tok_amount bigint, p_tok_hard bigint, p_tok_soft bigint,
    p_mic_period bigint, p_mic_amount bigint, p_mic_hard bigint, p_mic_soft bigint,
    p_hold_id text, p_kind text, p_model text, p_key text, p_priced_at bigint,
    p_rate_input bigint, p_rate_output bigint, p_rate_cache_write bigint, p_rate_cache_read bigint,
    p_created bigint, p_expires bigint, p_holder text)
RETURNS TABLE (o_existing text, o_tokens bigint, o_micros bigint, o_expires bigint, o_over boolean)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_tokens boolean;
    v_micros boolean;
    v_over boolean;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    IF p_key IS NOT NULL THEN
        RETURN QUERY SELECT h.hold_id::text, h.tokens_held, h.micros_held, h.expires_us, h.over_budget
            FROM metering_holds AS h WHERE h.tenant_id = p_tenant AND h.idempotency_key = p_key;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    WITH moved AS (
        INSERT INTO metering_budget_counters AS c (tenant_id, unit, period_us, used, held)
        SELECT p_tenant, v.unit, v.period_us, 0, v.amount
        FROM (SELECT 'tokens' AS unit, p_tok_period AS period_us, p_tok_amount AS amount, p_tok_hard AS lim
              UNION ALL
              SELECT 'micro_usd', p_mic_period, p_mic_amount, p_mic_hard) AS v
        WHERE v.amount > 0 AND (v.lim IS NULL OR v.amount <= v.lim)
        ON CONFLICT (tenant_id, unit, period_us) DO UPDATE SET held = c.held + excluded.held
        WHERE c.used + c.held + excluded.held <= COALESCE(
            CASE excluded.unit WHEN 'tokens' THEN p_tok_hard ELSE p_mic_hard END, c.used + c.held + excluded.held)
        RETURNING c.unit, c.used, c.held)
    SELECT coalesce(bool_or(m.unit = 'tokens'), false), coalesce(bool_or(m.unit = 'micro_usd'), false),
        coalesce(bool_or(m.used + m.held > CASE m.unit WHEN 'tokens' THEN p_tok_soft ELSE p_mic_soft END), false)
    INTO v_tokens, v_micros, v_over FROM moved AS m;
    IF p_tok_amount > 0 AND NOT v_tokens THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'metering: over budget', DETAIL = 'tokens';
    END IF;
    IF p_mic_amount > 0 AND NOT v_micros THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'metering: over budget', DETAIL = 'micro_usd';
    END IF;
    INSERT INTO metering_holds (tenant_id, hold_id, kind, model, idempotency_key, tokens_held, micros_held,
        tokens_period_us, micros_period_us, priced_at_us, rate_input, rate_output, rate_cache_write,
        rate_cache_read, state, over_budget, created_us, expires_us, settled_us, spent_input, spent_output,
        spent_cache_write, spent_cache_read, charged_tokens, charged_micros, holder, in_flight_tokens)
    VALUES (p_tenant, p_hold_id, p_kind, p_model, p_key, p_tok_amount, p_mic_amount, p_tok_period,
        p_mic_period, p_priced_at, p_rate_input, p_rate_output, p_rate_cache_write, p_rate_cache_read, 'open',
        v_over, p_created, p_expires, 0, 0, 0, 0, 0, 0, 0, p_holder, 0);
    RETURN QUERY SELECT NULL::text, p_tok_amount, p_mic_amount, p_expires, v_over;
END
$fn$"""

# A settlement: take this tenant's open hold of this kind when it can cover the spend (priced at
# its own rates, rounded up), then move its tokens counter, then its micro_usd counter. No row back:
# nothing changed (missing, settled, or the spend exceeds the hold). `state || ''` keeps the state
# test out of index conditions, so the hold is found by its primary key: on a table not yet analyzed
# (a fresh bridge schema or silo database) the planner otherwise walks ix_metering_holds_open and
# every dead 'open' entry settled holds left there (twice the database's CPU per pair, measured).
_SETTLE = """
CREATE FUNCTION metering_settle(
    p_tenant text, p_hold_id text, p_kind text, p_state text, p_now bigint,
    p_input bigint, p_output bigint, p_cache_write bigint, p_cache_read bigint, p_total bigint)
RETURNS TABLE (o_tokens_held bigint, o_micros_held bigint, o_charged_tokens bigint, o_charged_micros bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path FROM CURRENT
AS $fn$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    RETURN QUERY
    WITH h AS (
        UPDATE metering_holds AS m SET state = p_state, settled_us = p_now, spent_input = p_input,
            spent_output = p_output, spent_cache_write = p_cache_write, spent_cache_read = p_cache_read,
            charged_tokens = p_total,
            charged_micros = (m.rate_input * p_input + m.rate_output * p_output + m.rate_cache_write * p_cache_write
                + m.rate_cache_read * p_cache_read + 999999) / 1000000
        WHERE m.tenant_id = p_tenant AND m.hold_id = p_hold_id AND m.kind = p_kind AND m.state || '' = 'open'
            AND m.tokens_held >= p_total
            AND m.micros_held >= (m.rate_input * p_input + m.rate_output * p_output
                + m.rate_cache_write * p_cache_write + m.rate_cache_read * p_cache_read + 999999) / 1000000
        RETURNING m.tokens_held, m.micros_held, m.tokens_period_us, m.micros_period_us, m.charged_tokens,
            m.charged_micros),
    tok AS (UPDATE metering_budget_counters AS c
            SET held = c.held - h.tokens_held, used = c.used + h.charged_tokens
            FROM h WHERE c.tenant_id = p_tenant AND c.unit = 'tokens' AND c.period_us = h.tokens_period_us
            RETURNING c.unit),
    mic AS (UPDATE metering_budget_counters AS c
            SET held = c.held - h.micros_held, used = c.used + h.charged_micros
            FROM h WHERE c.tenant_id = p_tenant AND c.unit = 'micro_usd' AND c.period_us = h.micros_period_us
                AND (h.micros_held <> 0 OR h.charged_micros <> 0) AND (SELECT count(*) FROM tok) >= 0
            RETURNING c.unit)
    SELECT h.tokens_held, h.micros_held, h.charged_tokens, h.charged_micros FROM h
    WHERE (SELECT count(*) FROM mic) >= 0;
END
$fn$"""

# Many key-less reservations of one tenant with the same periods and limits (group commit): each in
# turn exactly as metering_reserve places one (so each is checked against the counters as the ones
# before it left them); any refusal raises and rolls back the whole call, which then did nothing.
# One row per reservation, in order: whether it passed a soft limit.
_RESERVE_MANY = """
CREATE FUNCTION metering_reserve_many(
    p_tenant text, p_tok_period bigint, p_tok_hard bigint, p_tok_soft bigint,
    p_mic_period bigint, p_mic_hard bigint, p_mic_soft bigint,
    p_tok_amounts bigint[], p_mic_amounts bigint[], p_hold_ids text[], p_models text[], p_priced_at bigint[],
    p_rate_input bigint[], p_rate_output bigint[], p_rate_cache_write bigint[], p_rate_cache_read bigint[],
    p_created bigint[], p_expires bigint[])
RETURNS TABLE (o_over boolean)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_tokens boolean;
    v_micros boolean;
    v_over boolean;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    FOR i IN 1 .. coalesce(array_length(p_hold_ids, 1), 0) LOOP
        WITH moved AS (
            INSERT INTO metering_budget_counters AS c (tenant_id, unit, period_us, used, held)
            SELECT p_tenant, v.unit, v.period_us, 0, v.amount
            FROM (SELECT 'tokens' AS unit, p_tok_period AS period_us, p_tok_amounts[i] AS amount, p_tok_hard AS lim
                  UNION ALL
                  SELECT 'micro_usd', p_mic_period, p_mic_amounts[i], p_mic_hard) AS v
            WHERE v.amount > 0 AND (v.lim IS NULL OR v.amount <= v.lim)
            ON CONFLICT (tenant_id, unit, period_us) DO UPDATE SET held = c.held + excluded.held
            WHERE c.used + c.held + excluded.held <= COALESCE(
                CASE excluded.unit WHEN 'tokens' THEN p_tok_hard ELSE p_mic_hard END,
                c.used + c.held + excluded.held)
            RETURNING c.unit, c.used, c.held)
        SELECT coalesce(bool_or(m.unit = 'tokens'), false), coalesce(bool_or(m.unit = 'micro_usd'), false),
            coalesce(bool_or(m.used + m.held > CASE m.unit WHEN 'tokens' THEN p_tok_soft ELSE p_mic_soft END), false)
        INTO v_tokens, v_micros, v_over FROM moved AS m;
        IF (p_tok_amounts[i] > 0 AND NOT v_tokens) OR (p_mic_amounts[i] > 0 AND NOT v_micros) THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'metering: over budget',
                DETAIL = CASE WHEN p_tok_amounts[i] > 0 AND NOT v_tokens THEN 'tokens' ELSE 'micro_usd' END;
        END IF;
        INSERT INTO metering_holds (tenant_id, hold_id, kind, model, idempotency_key, tokens_held, micros_held,
            tokens_period_us, micros_period_us, priced_at_us, rate_input, rate_output, rate_cache_write,
            rate_cache_read, state, over_budget, created_us, expires_us, settled_us, spent_input, spent_output,
            spent_cache_write, spent_cache_read, charged_tokens, charged_micros, holder, in_flight_tokens)
        VALUES (p_tenant, p_hold_ids[i], 'reservation', p_models[i], NULL, p_tok_amounts[i], p_mic_amounts[i],
            p_tok_period, p_mic_period, p_priced_at[i], p_rate_input[i], p_rate_output[i], p_rate_cache_write[i],
            p_rate_cache_read[i], 'open', v_over, p_created[i], p_expires[i], 0, 0, 0, 0, 0, 0, 0, '', 0);
        o_over := v_over;
        RETURN NEXT;
    END LOOP;
END
$fn$"""

# Many settlements of one tenant's holds of one kind (group commit; distinct hold ids): first every
# hold, each taken as metering_settle takes it, then the counters they move, summed per counter and
# moved in lock order (tokens before micro_usd, older periods first), as the expiry sweep does.
# A row back for each hold taken; the others changed nothing.
_SETTLE_MANY = """
CREATE FUNCTION metering_settle_many(
    p_tenant text, p_kind text, p_hold_ids text[], p_states text[], p_now bigint[],
    p_input bigint[], p_output bigint[], p_cache_write bigint[], p_cache_read bigint[], p_total bigint[])
RETURNS TABLE (o_hold_id text, o_tokens_held bigint, o_micros_held bigint, o_charged_tokens bigint,
    o_charged_micros bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_ids text[];
    v_th bigint[];
    v_mh bigint[];
    v_tp bigint[];
    v_mp bigint[];
    v_ct bigint[];
    v_cm bigint[];
    r record;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant, true);
    WITH s AS (
        SELECT * FROM unnest(p_hold_ids, p_states, p_now, p_input, p_output, p_cache_write, p_cache_read, p_total)
            AS s(hold_id, state, now_us, i, o, cw, cr, total)),
    h AS (
        UPDATE metering_holds AS m SET state = s.state, settled_us = s.now_us, spent_input = s.i,
            spent_output = s.o, spent_cache_write = s.cw, spent_cache_read = s.cr, charged_tokens = s.total,
            charged_micros = (m.rate_input * s.i + m.rate_output * s.o + m.rate_cache_write * s.cw
                + m.rate_cache_read * s.cr + 999999) / 1000000
        FROM s
        WHERE m.tenant_id = p_tenant AND m.hold_id = s.hold_id AND m.kind = p_kind AND m.state || '' = 'open'
            AND m.tokens_held >= s.total
            AND m.micros_held >= (m.rate_input * s.i + m.rate_output * s.o + m.rate_cache_write * s.cw
                + m.rate_cache_read * s.cr + 999999) / 1000000
        RETURNING m.hold_id, m.tokens_held, m.micros_held, m.tokens_period_us, m.micros_period_us,
            m.charged_tokens, m.charged_micros)
    SELECT array_agg(h.hold_id::text), array_agg(h.tokens_held), array_agg(h.micros_held),
        array_agg(h.tokens_period_us), array_agg(h.micros_period_us), array_agg(h.charged_tokens),
        array_agg(h.charged_micros)
    INTO v_ids, v_th, v_mh, v_tp, v_mp, v_ct, v_cm FROM h;
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

_SIGNATURES = (
    "metering_reserve(text, bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, text, text, text, "
    "text, bigint, bigint, bigint, bigint, bigint, bigint, bigint, text)",
    "metering_settle(text, text, text, text, bigint, bigint, bigint, bigint, bigint, bigint)",
    "metering_reserve_many(text, bigint, bigint, bigint, bigint, bigint, bigint, bigint[], bigint[], text[], "
    "text[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[])",
    "metering_settle_many(text, text, text[], text[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[])",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for function in (_RESERVE, _SETTLE, _RESERVE_MANY, _SETTLE_MANY):
        op.execute(function)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for signature in _SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
