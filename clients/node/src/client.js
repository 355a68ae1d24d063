// @ts-check
/**
 * A small Node.js client for diffstack, built from the same contract as every other client:
 * proto/diffstack/v1 is loaded at run time with @grpc/proto-loader (no generated code to keep fresh).
 *
 *   import { connect } from "./client.js";
 *   const client = connect("127.0.0.1:50051");
 *   const response = await client.generate({ spec: { prompt: "a small red circle at the top left", steps: 20 } });
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

/** proto/ at the repository root; DIFFSTACK_PROTO_ROOT overrides it for an installed copy. */
export const PROTO_ROOT =
  process.env.DIFFSTACK_PROTO_ROOT ??
  path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "proto");

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * Field names stay as the proto spells them (snake_case, like the field violations the server names),
 * 64-bit seeds arrive as strings (JavaScript numbers lose precision past 2^53), enums as their names.
 */
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

/** Load diffstack.v1 from PROTO_ROOT and return its package object (services are constructors). */
export function loadContract() {
  const definition = protoLoader.loadSync(
    ["diffstack/v1/generation.proto", "diffstack/v1/diagnostics.proto"],
    LOADER_OPTIONS,
  );
  // @ts-ignore: the loaded package's shape comes from the .proto files at run time
  return grpc.loadPackageDefinition(definition).diffstack.v1;
}

/**
 * Connect to a server. Every method returns a promise, except generateStream, which returns the
 * grpc-js readable stream (async-iterable) of GenerateStreamResponse events.
 *
 * @param {string} target host:port
 * @param {{credentials?: grpc.ChannelCredentials, adminToken?: string, apiKey?: string, timeoutMs?: number}} [options]
 */
export function connect(target, options = {}) {
  const v1 = loadContract();
  const credentials = options.credentials ?? grpc.credentials.createInsecure();
  const channelOptions = {
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
  };
  const generation = new v1.GenerationService(target, credentials, channelOptions);
  const diagnostics = new v1.DiagnosticsService(target, credentials, channelOptions);
  const timeoutMs = options.timeoutMs ?? 60_000;
  const admin = new grpc.Metadata();
  if (options.adminToken) admin.set("authorization", `Bearer ${options.adminToken}`);
  // The generation service's key, when the server requires one (server.api_keys).
  const caller = () => {
    const metadata = new grpc.Metadata();
    if (options.apiKey) metadata.set("authorization", `Bearer ${options.apiKey}`);
    return metadata;
  };

  const deadline = () => new Date(Date.now() + timeoutMs);
  /** @param {any} stub @param {string} method @param {object} request @param {grpc.Metadata} metadata */
  const unary = (stub, method, request, metadata) =>
    new Promise((resolve, reject) => {
      stub[method](request, metadata, { deadline: deadline() }, (/** @type {any} */ error, /** @type {any} */ response) =>
        error ? reject(error) : resolve(response),
      );
    });

  return {
    /** @param {object} request a GenerateRequest */
    generate: (request) => unary(generation, "Generate", request, caller()),
    /** @param {object} request a GenerateStreamRequest */
    generateStream: (request) => generation.GenerateStream(request, caller(), { deadline: deadline() }),
    /** @param {object} request a GenerateStreamRequest @param {string} [idempotencyKey] */
    submitJob: (request, idempotencyKey = "") =>
      unary(generation, "SubmitJob", { request, idempotency_key: idempotencyKey }, caller()),
    /** A job's events (each WatchJobResponse wraps one GenerateStreamResponse) from its start, or from now. */
    watchJob: (jobId, fromNow = false) =>
      generation.WatchJob({ job_id: jobId, from_now: fromNow }, caller(), { deadline: deadline() }),
    cancelJob: (jobId) => unary(generation, "CancelJob", { job_id: jobId }, caller()),
    listJobs: () => unary(generation, "ListJobs", {}, caller()),
    listPlugins: () => unary(diagnostics, "ListPlugins", {}, admin),
    getStack: (model = "") => unary(diagnostics, "GetStack", { model }, admin),
    listModels: () => unary(diagnostics, "ListModels", {}, admin),
    /** The installed LoRAs: name, size, rank, target modules, and which loaded models take them. */
    listLoras: () => unary(diagnostics, "ListLoras", {}, admin),
    getStats: () => unary(diagnostics, "GetStats", {}, admin),
    loadModel: (model) => unary(diagnostics, "LoadModel", { model }, admin),
    unloadModel: (model) => unary(diagnostics, "UnloadModel", { model }, admin),
    freeMemory: () => unary(diagnostics, "FreeMemory", {}, admin),
    close: () => {
      generation.close();
      diagnostics.close();
    },
  };
}

// The few google.rpc messages the server puts in an error's grpc-status-details-bin trailer.
const RPC_TYPES = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: "repeated", type: "FieldViolation", id: 1 } },
              nested: {
                FieldViolation: { fields: { field: { type: "string", id: 1 }, description: { type: "string", id: 2 } } },
              },
            },
            ErrorInfo: { fields: { reason: { type: "string", id: 1 }, domain: { type: "string", id: 2 } } },
            RequestInfo: { fields: { request_id: { type: "string", id: 1 } } },
          },
        },
      },
    },
  },
});

/**
 * The google.rpc details of a failed call: field violations by field, the reason and the request id.
 *
 * @param {any} error a grpc-js ServiceError
 * @returns {{code: number, violations: Record<string, string>, reason: string, requestId: string}}
 */
export function statusDetails(error) {
  const found = { code: error.code, violations: /** @type {Record<string, string>} */ ({}), reason: "", requestId: "" };
  const raw = error.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return found;
  const decode = (/** @type {string} */ name, /** @type {Uint8Array} */ bytes) =>
    /** @type {any} */ (RPC_TYPES.lookupType(name).toObject(RPC_TYPES.lookupType(name).decode(bytes)));
  for (const detail of decode("google.rpc.Status", raw).details ?? []) {
    if (detail.type_url.endsWith("/google.rpc.BadRequest")) {
      for (const v of decode("google.rpc.BadRequest", detail.value).field_violations ?? []) {
        found.violations[v.field] = v.description;
      }
    } else if (detail.type_url.endsWith("/google.rpc.ErrorInfo")) {
      found.reason = decode("google.rpc.ErrorInfo", detail.value).reason;
    } else if (detail.type_url.endsWith("/google.rpc.RequestInfo")) {
      found.requestId = decode("google.rpc.RequestInfo", detail.value).request_id;
    }
  }
  return found;
}

/**
 * An `Image` message for a request's `init_image` or `mask` from a PNG, JPEG or WebP file
 * (the server detects the format from the bytes).
 *
 * @param {string} file the picture's path
 * @returns {{data: Buffer}}
 */
export function imageFile(file) {
  return { data: readFileSync(file) };
}

export { grpc };
