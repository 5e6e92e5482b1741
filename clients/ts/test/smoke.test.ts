// Runs without any service: the generated descriptors carry each RPC's scope, so every client
// language can read the same rule the Python interceptor enforces.
import { test } from "node:test";
import assert from "node:assert/strict";
import { getOption, hasOption } from "@bufbuild/protobuf";
import { auth } from "../gen/bulkhead/common/v1/auth_pb.js";
import { StateService } from "../gen/bulkhead/state/v1/state_pb.js";

test("generated methods carry their auth rule from the proto", () => {
  const methods = Object.values(StateService.method);
  assert.ok(methods.length > 0);
  for (const m of methods) {
    assert.ok(hasOption(m, auth), `${m.name} has no auth rule`);
    const rule = getOption(m, auth);
    assert.ok(rule.public || rule.scope.startsWith("state."), `${m.name}: ${rule.scope}`);
  }
});

test("the error-reason catalog is generated and names ErrorInfo reasons", async () => {
  const { ErrorReason, errorReason } = await import("../src/index.js");
  assert.equal(ErrorReason[ErrorReason.INVALID_TENANT_ID], "INVALID_TENANT_ID");
  assert.equal(errorReason("TENANT_NOT_FOUND"), ErrorReason.TENANT_NOT_FOUND);
  assert.equal(errorReason("TENANT_ID_INVALID"), undefined); // folded into INVALID_TENANT_ID
  assert.equal(errorReason("ERROR_REASON_UNSPECIFIED"), undefined);
});
