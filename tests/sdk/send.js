// Sends events to amp2dify with Amplitude's own Node SDK (serverUrl), and
// prints one JSON line per track() result: {"code","message"}.
//   node send.js SERVER_URL API_KEY COUNT PREFIX
const amplitude = require('@amplitude/analytics-node');

async function main() {
  const [url, key, count, prefix] = process.argv.slice(2);
  const client = amplitude.createInstance();
  await client.init(key, {
    serverUrl: url,
    flushQueueSize: 10,
    flushIntervalMillis: 100,
    flushMaxRetries: 3,
    logLevel: amplitude.Types.LogLevel.None,
  }).promise;
  const results = [];
  for (let i = 0; i < Number(count); i++) {
    results.push(
      client.track(`sdk_event_${i % 3}`, { step: i }, {
        user_id: `sdk-user-${i % 4}`,
        insert_id: `${prefix}-${i}`,
      }).promise,
    );
  }
  await client.flush().promise;
  for (const r of await Promise.all(results)) {
    console.log(JSON.stringify({ code: r.code, message: r.message }));
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
