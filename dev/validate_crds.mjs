// Validates Prometheus Operator resources (JSON files, one object each) against the CRD schemas
// of @kubernetes-models/prometheus-operator, installed by dev/setup.sh. Run with NODE_PATH unset:
//   node dev/validate_crds.mjs DIR_OF_THE_PACKAGE FILE.json...
import fs from 'fs';
import path from 'path';
import { pathToFileURL } from 'url';

const [pkgDir, ...files] = process.argv.slice(2);
const entry = path.join(pkgDir, 'node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js');
const v1 = await import(pathToFileURL(entry).href);
let failed = 0;
for (const f of files) {
  const doc = JSON.parse(fs.readFileSync(f, 'utf8'));
  const Kind = v1[doc.kind];
  if (!Kind) { failed = 1; console.log(`FAILED ${f}: no schema for ${doc.apiVersion} ${doc.kind}`); continue; }
  try { new Kind(doc).validate(); console.log(`ok ${f} ${doc.kind}`); }
  catch (e) { failed = 1; console.log(`FAILED ${f}: ${e.message}`); }
}
process.exit(failed);
