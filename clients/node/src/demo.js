#!/usr/bin/env node
// @ts-check
/**
 * Exercise a diffstack server from Node.js: list plugins, stream a generation with progress and write
 * its image, generate once more (unary), and check that a bad request gets INVALID_ARGUMENT naming
 * the field. The last line on stdout is a JSON summary (the CI test reads it).
 *
 *   node src/demo.js --target 127.0.0.1:50051 --out ./out [--steps 4] [--admin-token TOKEN]
 *     [--format png|webp|jpeg] [--quality 1-100] [--effort 0-6] [--lossless]
 *
 * --format and its options apply to the unary generation (the stream's image stays PNG).
 */
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import { connect, grpc, statusDetails } from "./client.js";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    out: { type: "string", default: "out" },
    steps: { type: "string", default: "4" },
    prompt: { type: "string", default: "a lighthouse on a cliff at dusk" },
    "admin-token": { type: "string" },
    format: { type: "string", default: "png" },
    quality: { type: "string" },
    effort: { type: "string" },
    lossless: { type: "boolean", default: false },
  },
});

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
  console.error(error);
  process.exit(1);
});
