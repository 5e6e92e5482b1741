// A thin TypeScript client for the Bulkhead mesh over gRPC (HTTP/2), built on the stubs that
// `npm run generate` writes into gen/ from the same protos as the Python services.
import { readFileSync } from "node:fs";
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { DescService } from "@bufbuild/protobuf";
import { ErrorReason } from "../gen/bulkhead/common/v1/errors_pb.js";

/** Who the calls act for: the token's tenant must equal tenantId or the server refuses. */
export interface Credentials {
  /** A JWT issued by identity (IssueToken / ExchangeToken). */
  token: string;
  /** The tenant the token names; sent as x-tenant-id. */
  tenantId: string;
}

/** mTLS files, as written by `bulkhead certs dev --out DIR` (DIR/ca.pem, DIR/client.pem, DIR/client-key.pem). */
export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

/** Options for one connection to one service. */
export interface ConnectOptions {
  /** Credentials to attach to every call; omit for public methods (IssueToken by API key). */
  credentials?: Credentials | (() => Credentials | undefined);
  /** Use mTLS with these files; plaintext HTTP/2 otherwise. */
  tls?: TlsFiles;
  /** A request id to send as x-request-id (idempotency keys derive from it). */
  requestId?: () => string | undefined;
  /** Deadline for every call, in milliseconds. */
  timeoutMs?: number;
}

/** Adds authorization, x-tenant-id and x-request-id to each request, as the Python interceptors do. */
export function bulkheadInterceptor(options: ConnectOptions): Interceptor {
  return (next) => async (req) => {
    const creds = typeof options.credentials === "function" ? options.credentials() : options.credentials;
    if (creds) {
      req.header.set("authorization", `Bearer ${creds.token}`);
      req.header.set("x-tenant-id", creds.tenantId);
    }
    const requestId = options.requestId?.();
    if (requestId) req.header.set("x-request-id", requestId);
    return next(req);
  };
}

/** A gRPC transport to `address` ("host:port"), plaintext or mTLS. */
export function bulkheadTransport(address: string, options: ConnectOptions = {}): Transport {
  const tls = options.tls;
  return createGrpcTransport({
    baseUrl: `${tls ? "https" : "http"}://${address}`,
    interceptors: [bulkheadInterceptor(options)],
    defaultTimeoutMs: options.timeoutMs ?? 10_000,
    nodeOptions: tls
      ? { ca: readFileSync(tls.ca), cert: readFileSync(tls.cert), key: readFileSync(tls.key) }
      : undefined,
  });
}

/** A typed client for one service (e.g. `serviceClient(IdentityService, "127.0.0.1:50051", {...})`). */
export function serviceClient<T extends DescService>(
  service: T,
  address: string,
  options: ConnectOptions = {},
): Client<T> {
  return createClient(service, bulkheadTransport(address, options));
}

/** The error-reason catalog (protos/bulkhead/common/v1/errors.proto), shared with every service. */
export { ErrorReason };

/**
 * The catalog member a google.rpc.ErrorInfo reason string names (ErrorInfo.reason is the ErrorReason
 * value's name, e.g. "INVALID_TENANT_ID"), or undefined for a reason outside the catalog.
 */
export function errorReason(reason: string): ErrorReason | undefined {
  const value = (ErrorReason as unknown as Record<string, number | string>)[reason];
  const known = typeof value === "number" && value !== ErrorReason.ERROR_REASON_UNSPECIFIED;
  return known ? (value as ErrorReason) : undefined;
}
