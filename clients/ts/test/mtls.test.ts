// The TypeScript client over mTLS: tests/clients/test_ts_client.py starts identity with
// BULKHEAD_TLS_* set and passes the client's files as BULKHEAD_TEST_TLS_{CA,CERT,KEY}.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { ConnectError, Code, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { IdentityService } from "../gen/bulkhead/identity/v1/identity_pb.js";
import { serviceClient, type TlsFiles } from "../src/index.js";

const address = process.env.BULKHEAD_IDENTITY_ADDR;
const operatorKey = process.env.BULKHEAD_OPERATOR_KEY;
const tls: TlsFiles | undefined = process.env.BULKHEAD_TEST_TLS_CA
  ? { ca: process.env.BULKHEAD_TEST_TLS_CA!, cert: process.env.BULKHEAD_TEST_TLS_CERT!, key: process.env.BULKHEAD_TEST_TLS_KEY! }
  : undefined;
const configured = { skip: !address || !operatorKey || !tls };

test("with a CA-signed client certificate, IssueToken works over mTLS", configured, async () => {
  const identity = serviceClient(IdentityService, address!, { tls });
  const issued = await identity.issueToken({ apiKey: operatorKey! });
  assert.equal(issued.tenantId, "t_platform");
  assert.ok(issued.token.split(".").length === 3);
});

test("without a client certificate the server refuses the connection", configured, async () => {
  // Trusts the server's CA but presents no certificate of its own.
  const transport = createGrpcTransport({
    baseUrl: `https://${address}`,
    nodeOptions: { ca: readFileSync(tls!.ca) },
    defaultTimeoutMs: 5_000,
  });
  const identity = createClient(IdentityService, transport);
  await assert.rejects(identity.issueToken({ apiKey: operatorKey! }), (err) => {
    const e = ConnectError.from(err);
    // With TLS 1.3 the server rejects the missing certificate after the client's side of the
    // handshake finished, so Node sees the HTTP/2 session torn down (CANCEL) rather than a
    // handshake error; either way no request reached a handler.
    assert.ok([Code.Unavailable, Code.Canceled, Code.Internal].includes(e.code), `${Code[e.code]}: ${e.message}`);
    return true;
  });
});
