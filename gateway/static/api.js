// The page's OpenAI client pieces: server-sent events over fetch and OpenAI error bodies.

/** Yield the data of each server-sent event of a fetch Response (comments skipped). */
export async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder(); // stream mode: a UTF-8 character split across reads waits
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      buffer = buffer.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n")
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, ""));
        if (data.length) yield data.join("\n");
      }
      if (done) break;
    }
  } finally {
    reader.releaseLock();
  }
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || error.type || null;
  }
}

/** The ApiError of a failed response (its OpenAI error body, or the status line). */
export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = { error: { message: `${response.status} ${response.statusText}` } };
  }
  const err = new ApiError(response.status, body);
  const retry = response.headers.get("Retry-After");
  if (retry) err.message += ` (retry after ${retry} s)`;
  return err;
}
