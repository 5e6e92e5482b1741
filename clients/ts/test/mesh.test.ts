// End to end through the generated TypeScript client against the running Python services.
// tests/clients/test_ts_client.py starts the services and sets:
//   BULKHEAD_<SVC>_ADDR    host:port of each service that runs
//   BULKHEAD_OPERATOR_KEY  the platform operator's API key (identity's first start)
// A part whose service is not running is skipped, and the pytest side fails on any skip,
// so a green run means every part ran.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { ConnectError, Code } from "@connectrpc/connect";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { IdentityService } from "../gen/bulkhead/identity/v1/identity_pb.js";
import { CredentialsService } from "../gen/bulkhead/credentials/v1/credentials_pb.js";
import { OrchestratorService, RunStatus } from "../gen/bulkhead/orchestrator/v1/orchestrator_pb.js";
import { MeteringService } from "../gen/bulkhead/metering/v1/metering_pb.js";
import { Tier } from "../gen/bulkhead/common/v1/tenancy_pb.js";
import { serviceClient, type Credentials } from "../src/index.js";

const addr = (svc: string): string | undefined => process.env[`BULKHEAD_${svc.toUpperCase()}_ADDR`];
const operatorKey = process.env.BULKHEAD_OPERATOR_KEY;
const suffix = Math.random().toString(36).slice(2, 8);
const encoder = new TextEncoder();

/** Expects the call to fail with one of the codes; returns the error. */
async function refused(call: Promise<unknown>, codes: Code[]): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    const e = ConnectError.from(err);
    assert.ok(codes.includes(e.code), `expected ${codes.map((c) => Code[c])}, got ${Code[e.code]}: ${e.message}`);
    return e;
  }
  assert.fail("the call succeeded but should have been refused");
}

async function eventually<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("bulkhead mesh through the TypeScript client", { skip: !addr("identity") || !operatorKey }, () => {
  const identityAddr = addr("identity")!;
  let tenantA: Credentials;
  let tenantB: Credentials;
  let tenantAId = "";

  before(async () => {
    const anonymous = serviceClient(IdentityService, identityAddr);
    const op = await anonymous.issueToken({ apiKey: operatorKey! });
    const operator = serviceClient(IdentityService, identityAddr, {
      credentials: { token: op.token, tenantId: op.tenantId },
    });
    const issue = async (name: string): Promise<Credentials> => {
      const created = await operator.createTenant({ name: `${name}-${suffix}`, tier: Tier.POOLED });
      const issued = await anonymous.issueToken({ apiKey: created.adminApiKey, ttlSeconds: 600 });
      assert.equal(issued.tenantId, created.tenant!.id);
      return { token: issued.token, tenantId: issued.tenantId };
    };
    tenantA = await issue("ts-alpha");
    tenantB = await issue("ts-bravo");
    tenantAId = tenantA.tenantId;
  });

  test("IssueToken gives a tenant a token that works on its own tenant", async () => {
    const client = serviceClient(IdentityService, identityAddr, { credentials: tenantA });
    const reply = await client.getTenant({});
    assert.equal(reply.tenant?.id, tenantAId);
  });

  test("identity refuses a cross-tenant call", async () => {
    // B's token presented for A's tenant id: the interceptor refuses before any handler runs.
    const forged = serviceClient(IdentityService, identityAddr, {
      credentials: { token: tenantB.token, tenantId: tenantAId },
    });
    await refused(forged.getTenant({}), [Code.PermissionDenied]);
    // B asking for A's tenant by id with its own, valid identity: no access, no existence leak.
    const asB = serviceClient(IdentityService, identityAddr, { credentials: tenantB });
    await refused(asB.getTenant({ tenantId: tenantAId }), [Code.NotFound, Code.PermissionDenied]);
    // No token at all.
    await refused(serviceClient(IdentityService, identityAddr).getTenant({}), [Code.Unauthenticated]);
  });

  test("credentials: a secret created by A is invisible to B", { skip: !addr("credentials") }, async () => {
    const asA = serviceClient(CredentialsService, addr("credentials")!, { credentials: tenantA });
    const asB = serviceClient(CredentialsService, addr("credentials")!, { credentials: tenantB });
    const value = encoder.encode(`s3cret-${suffix}`);
    const put = await asA.putSecret({ name: "db-password", value });
    assert.ok(put.secret !== undefined);
    const got = await asA.getSecret({ name: "db-password" });
    assert.deepEqual(got.value, value);
    const err = await refused(asB.getSecret({ name: "db-password" }), [Code.NotFound]);
    assert.ok(!err.message.includes(`s3cret-${suffix}`));
  });

  test("orchestrator + metering: A starts a run and reads its usage; B sees neither",
    { skip: !addr("orchestrator") || !addr("metering") || !addr("inference") || !addr("state") }, async () => {
      const orchA = serviceClient(OrchestratorService, addr("orchestrator")!, { credentials: tenantA });
      const orchB = serviceClient(OrchestratorService, addr("orchestrator")!, { credentials: tenantB });
      await orchA.createTeam({
        team: { name: "support", agents: [{ name: "helper", systemPrompt: "Answer briefly." }] },
      });
      const started = await orchA.startRun({ team: "support", input: "hello from TypeScript" });
      const runId = started.run!.runId;
      const done = await eventually("the run to finish", async () => {
        const { run } = await orchA.getRun({ runId });
        return run && [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED].includes(run.status) ? run : undefined;
      });
      assert.equal(done.status, RunStatus.SUCCEEDED, `${done.errorReason}: ${done.errorMessage}`);
      await refused(orchB.getRun({ runId }), [Code.NotFound]);

      const meterA = serviceClient(MeteringService, addr("metering")!, { credentials: tenantA });
      const meterB = serviceClient(MeteringService, addr("metering")!, { credentials: tenantB });
      const filter = {
        startTime: timestampFromDate(new Date(Date.now() - 3_600_000)),
        endTime: timestampFromDate(new Date(Date.now() + 3_600_000)),
      };
      const rows = await eventually("usage to reach metering", async () => {
        const reply = await meterA.queryUsage({ filter });
        const total = reply.rows.reduce((n, r) => n + Number(r.eventCount), 0);
        return total > 0 ? reply.rows : undefined;
      });
      assert.ok(rows.every((r) => r.tenantId === tenantAId || r.tenantId === ""));
      const other = await meterB.queryUsage({ filter });
      assert.equal(other.rows.reduce((n, r) => n + Number(r.eventCount), 0), 0);
    });
});

after(() => {
  // Transports hold HTTP/2 sessions open; end the process promptly once the tests are done.
  setImmediate(() => process.exit(process.exitCode ?? 0));
});
