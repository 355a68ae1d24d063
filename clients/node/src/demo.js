#!/usr/bin/env node
// @ts-check
/**
 * Exercise a diffstack server from Node.js: list plugins, stream a generation with progress and write
 * its image, generate once more (unary), and check that a bad request gets INVALID_ARGUMENT naming
 * the field. The last line on stdout is a JSON summary (the CI test reads it).
 *
 *   node src/demo.js --target 127.0.0.1:50051 --out ./out [--steps 4] [--prompt TEXT] [--admin-token TOKEN]
 *     [--format png|webp|jpeg] [--quality 1-100] [--effort 0-6] [--lossless]
 *   node src/demo.js --help
 *
 * --format and its options apply to the unary generation (the stream's image stays PNG).
 */
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import { connect, grpc, statusDetails } from "./client.js";

/** A prompt from the grammar the embedded default model was trained on (README.md). */
const DEFAULT_PROMPT = "a large yellow triangle on the right on a black background";

const USAGE = `usage: node src/demo.js [--target HOST:PORT] [--out DIR] [--steps N] [--prompt TEXT] [--admin-token TOKEN]
                        [--format png|webp|jpeg] [--quality 1-100] [--effort 0-6] [--lossless]

Lists the server's plugins, streams one generation (with progress) and writes its image, generates
once more (unary), and checks that a bad request gets INVALID_ARGUMENT naming the field.

  --target HOST:PORT    the diffstack server (default: 127.0.0.1:50051)
  --out DIR             where images go (default: out)
  --steps N             denoising steps (default: 4)
  --prompt TEXT         what to draw (default: "${DEFAULT_PROMPT}",
                        from the embedded model's grammar: see README.md)
  --admin-token TOKEN   the server's admin token, if it has one
  --format FORMAT       the unary generation's image format: png, webp or jpeg (default: png)
  --quality N           webp/jpeg quality, 1-100
  --effort N            webp encoding effort, 0-6
  --lossless            lossless webp
  -h, --help            show this text`;

/**
 * @returns {{ target: string, out: string, steps: string, prompt: string, "admin-token"?: string,
 *   format: string, quality?: string, effort?: string, lossless: boolean }}
 */
function parseCommandLine() {
  try {
    const { values } = parseArgs({
      options: {
        target: { type: "string", default: "127.0.0.1:50051" },
        out: { type: "string", default: "out" },
        steps: { type: "string", default: "4" },
        prompt: { type: "string", default: DEFAULT_PROMPT },
        "admin-token": { type: "string" },
        format: { type: "string", default: "png" },
        quality: { type: "string" },
        effort: { type: "string" },
        lossless: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
    if (values.help) {
      console.log(USAGE);
      process.exit(0);
    }
    if (!/^[1-9][0-9]*$/.test(values.steps ?? "")) throw new Error(`--steps must be a positive whole number, got ${values.steps}`);
    return /** @type {any} */ (values);
  } catch (error) {
    console.error(`error: ${/** @type {Error} */ (error).message}\n\n${USAGE}`);
    process.exit(2);
  }
}

const args = parseCommandLine();

const EXTENSIONS = { IMAGE_FORMAT_PNG: "png", IMAGE_FORMAT_WEBP: "webp", IMAGE_FORMAT_JPEG: "jpg" };

/** @param {any} generated a GeneratedImage @param {string} stem */
function writeImage(generated, stem) {
  const extension = EXTENSIONS[/** @type {keyof EXTENSIONS} */ (generated.image.format)] ?? "bin";
  const file = path.join(args.out ?? "out", `${stem}-${generated.seed}.${extension}`);
  writeFileSync(file, generated.image.data);
  return file;
}

async function main() {
  const client = connect(args.target ?? "", { adminToken: args["admin-token"] });
  const steps = Number(args.steps);
  mkdirSync(args.out ?? "out", { recursive: true });
  const summary = { plugins: /** @type {string[]} */ ([]), progress: /** @type {number[]} */ ([]), files: /** @type {string[]} */ ([]) };
  try {
    const { plugins } = /** @type {any} */ (await client.listPlugins());
    for (const plugin of plugins) {
      console.log(`plugin ${plugin.name} ${plugin.version} (${plugin.distribution}) ${plugin.status} hooks=${plugin.hooks.join(",")}`);
      summary.plugins.push(plugin.name);
    }

    const stream = client.generateStream({ spec: { prompt: args.prompt, steps, seeds: ["7"] }, output: { format: "IMAGE_FORMAT_PNG" } });
    for await (const message of stream) {
      if (message.event === "queued") console.log(`queued at position ${message.queued.position}`);
      if (message.event === "progress") {
        console.log(`step ${message.progress.step}/${message.progress.total}`);
        summary.progress.push(message.progress.step);
      }
      if (message.event === "result") {
        const file = writeImage(message.result.images[0], "stream");
        console.log(`wrote ${file} (model ${message.result.model})`);
        summary.files.push(file);
      }
    }

    const output = {
      format: `IMAGE_FORMAT_${(args.format ?? "png").toUpperCase()}`,
      lossless: args.lossless ?? false,
      ...(args.quality === undefined ? {} : { quality: Number(args.quality) }),
      ...(args.effort === undefined ? {} : { effort: Number(args.effort) }),
    };
    const response = /** @type {any} */ (await client.generate({ spec: { prompt: args.prompt, steps, seeds: ["8"] }, output }));
    const file = writeImage(response.result.images[0], "unary");
    console.log(`wrote ${file}`);
    summary.files.push(file);

    let rejected = null;
    try {
      await client.generate({ spec: { prompt: args.prompt, width: 7, steps } });
    } catch (error) {
      const details = statusDetails(error);
      console.log(`bad request: ${grpc.status[details.code]} ${JSON.stringify(details.violations)}`);
      rejected = { code: grpc.status[details.code], fields: Object.keys(details.violations), reason: details.reason };
    }
    if (rejected?.code !== "INVALID_ARGUMENT" || !rejected.fields.includes("spec.width")) {
      throw new Error(`expected INVALID_ARGUMENT naming spec.width, got ${JSON.stringify(rejected)}`);
    }
    console.log(JSON.stringify({ ok: true, ...summary, rejected }));
  } finally {
    client.close();
  }
}

main().catch((error) => {
  // A gRPC failure (an unreachable target, a refused call) is one line; anything else is a bug: in full.
  if (typeof error?.code === "number" && error.code in grpc.status) {
    console.error(`error: ${args.target}: ${grpc.status[error.code]}: ${(error.details || error.message).trim()}`);
  } else {
    console.error(error);
  }
  process.exit(1);
});
