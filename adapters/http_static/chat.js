// chatforge web chat: talks to the adapter's OpenAI-style API (/v1/...) and streams replies.
// Untrusted text only ever reaches the page through textContent or markdown.js, never as HTML.

import { renderInto } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  name: $("bot-name"), messages: $("messages"), composer: $("composer"), input: $("input"), send: $("send"),
  newChat: $("new-chat"), commandsButton: $("commands-button"), commands: $("commands"), error: $("error"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyMessage: $("key-message"),
  keyCancel: $("key-cancel"), keyProblem: $("key-problem"), forgetKey: $("forget-key"),
};

const KEY = "chatforge.apiKey";
const CONVERSATION = "chatforge.conversation";
const TRANSCRIPT = "chatforge.transcript"; // sessionStorage: what this tab showed, so a reload keeps it
const KEPT_MESSAGES = 200;

// Storage can be missing or full (private windows): the page still works, it just forgets on reload.
const storage = (area) => ({
  get(name) { try { return area().getItem(name); } catch { return null; } },
  set(name, value) {
    try { value === null ? area().removeItem(name) : area().setItem(name, value); } catch { /* not kept */ }
  },
});
const local = storage(() => window.localStorage);
const session = storage(() => window.sessionStorage);

// What an Authorization header can carry: printable ASCII, no spaces. A pasted key with a zero-width space or a
// curly quote in it would make fetch throw building the headers (which looks like "cannot reach the server").
const VALID_KEY = /^[\x21-\x7e]+$/;
let apiKey = VALID_KEY.test(local.get(KEY) || "") ? local.get(KEY) : null;
if (!apiKey) local.set(KEY, null); // a bad one saved by an older page is dropped: the page asks again
let conversationId = local.get(CONVERSATION) || newConversation();
let model = null;
let commandPrefix = "/";
let commands = [];
let commandsOpenedByTyping = false;
let current = null; // the reply being streamed: {abort: AbortController}
let transcript = [];

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

/** A relative URL, so a proxy may serve the page under a path prefix. */
const apiUrl = (path) => new URL(path, document.baseURI);

/** fetch with the API key; on 401 asks for a key and retries once. Non-2xx answers become ApiErrors. */
async function request(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { ...init.headers };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    let response;
    try {
      response = await fetch(apiUrl(path), { ...init, headers, cache: "no-store" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("Cannot reach the server. Check the connection and try again.");
    }
    if (response.status === 401) {
      if (attempt === 0) {
        await askForKey(apiKey ? "The saved API key was refused. Enter the API key:" : "This chat needs an API key.");
        continue;
      }
      // The server's words are for API clients (which header to send): a person just needs another key.
      setKey(null); // the next try asks again instead of resending a refused key
      throw new ApiError("That API key was refused.", 401);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }
}

/** The ApiError for a non-2xx answer: the server's message, and when to try again for 429/503. */
async function errorFrom(response) {
  let message = `The server answered ${response.status} ${response.statusText}`.trim() + ".";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = String(body.error.message);
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 429 || response.status === 503) {
    const seconds = retryAfter(response.headers.get("Retry-After"));
    if (seconds !== null && !message.includes(`${seconds} s`)) message += ` (try again in ${seconds} s)`;
  }
  return new ApiError(message, response.status);
}

/** Retry-After as whole seconds: either a number of seconds or an HTTP date. */
function retryAfter(value) {
  if (value === null) return null;
  const seconds = /^\s*\d+\s*$/.test(value) ? Number(value) : Math.ceil((Date.parse(value) - Date.now()) / 1000);
  return Number.isFinite(seconds) ? Math.max(0, seconds) : null;
}

function setKey(key) {
  apiKey = key && VALID_KEY.test(key) ? key : null;
  local.set(KEY, apiKey);
  ui.forgetKey.hidden = !apiKey;
}

/** What is wrong with a key typed or pasted in the dialog, in a person's words; null if nothing is. */
function keyProblem(key) {
  if (VALID_KEY.test(key)) return null;
  const bad = [...key].find((character) => !/[\x21-\x7e]/.test(character));
  const code = `U+${bad.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
  const what = /\s/.test(bad) ? `a space (${code})`
    : /[\p{Cf}\p{Cc}]/u.test(bad) ? `an invisible character (${code}), perhaps pasted with it`
      : `the character \u201c${bad}\u201d (${code}), perhaps changed by the editor it was copied from`;
  return `This key contains ${what}. An API key is plain ASCII letters, digits and symbols: paste it again, or type it.`;
}

function showKeyProblem(problem) {
  ui.keyProblem.textContent = problem || "";
  ui.keyProblem.hidden = !problem;
  if (problem) ui.keyInput.setAttribute("aria-invalid", "true");
  else ui.keyInput.removeAttribute("aria-invalid");
}

// One dialog for all the requests refused at once (the model, the commands and a message may all be).
let keyRequest = null;
function askForKey(message) {
  if (!keyRequest) {
    keyRequest = new Promise((resolve, reject) => {
      ui.keyMessage.textContent = message;
      ui.keyInput.value = "";
      showKeyProblem(null);
      const finish = (key) => {
        ui.keyForm.removeEventListener("submit", onSubmit);
        ui.keyInput.removeEventListener("input", onInput);
        ui.keyCancel.removeEventListener("click", onCancel);
        ui.keyDialog.removeEventListener("cancel", onCancel);
        if (ui.keyDialog.open) ui.keyDialog.close();
        keyRequest = null;
        if (key) { setKey(key); resolve(); } else reject(new ApiError("An API key is needed to chat.", 401));
      };
      const onSubmit = (event) => {
        event.preventDefault(); // no navigation (and the page's CSP has form-action 'none')
        const key = ui.keyInput.value.trim();
        if (!key) return;
        const problem = keyProblem(key);
        if (problem) { showKeyProblem(problem); ui.keyInput.focus(); return; } // never saved, never sent
        finish(key);
      };
      const onInput = () => showKeyProblem(null);
      const onCancel = (event) => { event.preventDefault(); finish(null); };
      ui.keyForm.addEventListener("submit", onSubmit);
      ui.keyInput.addEventListener("input", onInput);
      ui.keyCancel.addEventListener("click", onCancel);
      ui.keyDialog.addEventListener("cancel", onCancel); // Escape
      ui.keyDialog.showModal();
      ui.keyInput.focus();
    });
  }
  return keyRequest;
}

async function loadModel() {
  const body = await (await request("v1/models")).json();
  const first = body && Array.isArray(body.data) ? body.data[0] : null;
  if (!first || !first.id) throw new ApiError("The server lists no model.");
  model = String(first.id);
  ui.name.textContent = model;
  for (const speaker of ui.messages.querySelectorAll(".message.bot .speaker")) speaker.textContent = `${model}:`;
  document.title = model;
}

async function loadCommands() {
  const body = await (await request("v1/commands")).json();
  commandPrefix = typeof body.prefix === "string" ? body.prefix : "/";
  commands = Array.isArray(body.commands) ? body.commands.filter((command) => command && command.name) : [];
  ui.commandsButton.hidden = commands.length === 0;
}

// ------------------------------------------------------------------ conversation

function newConversation() {
  // getRandomValues also works on plain http (randomUUID needs a secure context: a phone on the LAN has none).
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40; // a version 4 UUID
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  const id = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  local.set(CONVERSATION, id);
  return id;
}

function startNewChat() {
  if (current) current.abort.abort();
  current = null;
  conversationId = newConversation();
  transcript = [];
  session.set(TRANSCRIPT, null);
  ui.messages.replaceChildren();
  hideError();
  closeCommands();
  setBusy(false);
  ui.input.focus();
}

function remember(role, text) {
  transcript.push({ role, text });
  saveTranscript();
}

function forgetLast(role, text) {
  const last = transcript[transcript.length - 1];
  if (last && last.role === role && last.text === text) { transcript.pop(); saveTranscript(); }
}

function saveTranscript() {
  transcript = transcript.slice(-KEPT_MESSAGES);
  session.set(TRANSCRIPT, JSON.stringify({ conversation: conversationId, messages: transcript }));
}

function restoreTranscript() {
  try {
    const saved = JSON.parse(session.get(TRANSCRIPT) || "null");
    if (!saved || saved.conversation !== conversationId || !Array.isArray(saved.messages)) return;
    for (const { role, text } of saved.messages) {
      if ((role === "user" || role === "bot") && typeof text === "string") {
        showText(addMessage(role), role, text);
        transcript.push({ role, text });
      }
    }
    scrollToEnd(true);
  } catch { /* a damaged transcript is just not shown */ }
}

// ------------------------------------------------------------------ messages

function addMessage(role) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  // Who said it, for screen readers (the bubbles' sides and colours say it to the eye).
  const speaker = document.createElement("span");
  speaker.className = "speaker visually-hidden";
  speaker.textContent = role === "user" ? "You:" : `${model || ui.name.textContent}:`;
  message.appendChild(speaker);
  const body = document.createElement("div");
  body.className = "body";
  message.appendChild(body);
  ui.messages.appendChild(message);
  return message;
}

function showText(message, role, text) {
  const body = message.querySelector(".body");
  if (role === "user") {
    body.textContent = text;
  } else if (!text.trim()) {
    message.classList.add("empty"); // a plugin chose not to answer
    body.textContent = "(no reply)";
  } else {
    renderInto(body, text);
  }
}

const nearEnd = () => ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 48;
function scrollToEnd(force) {
  if (force || nearEnd()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  // The log is read when a reply is complete, not again at every frame that re-renders it.
  if (busy) ui.messages.setAttribute("aria-busy", "true");
  else ui.messages.removeAttribute("aria-busy");
}

async function send(text) {
  if (current || !text.trim()) return;
  hideError();
  closeCommands();
  ui.input.value = "";
  resizeInput();
  const turn = { abort: new AbortController() };
  current = turn;
  setBusy(true);
  const question = addMessage("user");
  showText(question, "user", text);
  const answer = addMessage("bot");
  answer.classList.add("pending");
  scrollToEnd(true);
  let started = false;
  try {
    if (!model) {
      await loadModel(); // the request names the model
      if (!commands.length) loadCommands().catch(() => {}); // they failed with the model (no key yet)
    }
    const response = await request("v1/chat/completions", {
      method: "POST",
      signal: turn.abort.signal,
      headers: { "Content-Type": "application/json", "X-Chatforge-Conversation": conversationId },
      // Only the new message: the server remembers the conversation.
      body: JSON.stringify({ model, messages: [{ role: "user", content: text }], stream: true }),
    });
    started = true;
    remember("user", text);
    const reply = await readReply(response, answer, turn.abort.signal);
    remember("bot", reply);
  } catch (error) {
    if (turn.abort.signal.aborted) return; // "New chat" cleared the page
    if (!started || error.beforeReply) {
      // The server never took the message, or failed before a word of the reply: take it back and give the
      // text back to edit or resend.
      if (started) forgetLast("user", text);
      question.remove();
      answer.remove();
      if (!ui.input.value) { ui.input.value = text; resizeInput(); }
    } else {
      answer.classList.add("failed");
    }
    showError(error.message || String(error));
  } finally {
    answer.classList.remove("pending");
    if (current === turn) { current = null; setBusy(false); }
  }
}

/** Streams the reply into `message`; resolves with its final text. */
async function readReply(response, message, signal) {
  const body = message.querySelector(".body");
  let text = "";
  // Re-render at most once per frame (a reply arrives in many small pieces), and leave the page twice a
  // render's time between two renders (a long reply on a slow phone takes a while to render).
  let frame = 0, timer = 0, pending = false, lastEnd = 0, lastCost = 0;
  const draw = () => {
    frame = timer = 0;
    pending = false;
    const start = performance.now();
    const follow = nearEnd();
    renderInto(body, text);
    if (follow) scrollToEnd(true);
    lastEnd = performance.now();
    lastCost = lastEnd - start;
  };
  const schedule = () => {
    if (pending) return;
    pending = true;
    const wait = 2 * lastCost - (performance.now() - lastEnd);
    if (wait > 16) timer = setTimeout(() => { frame = requestAnimationFrame(draw); }, wait);
    else frame = requestAnimationFrame(draw);
  };
  const cancel = () => { // true if a render was due
    clearTimeout(timer);
    cancelAnimationFrame(frame);
    const due = pending;
    frame = timer = 0;
    pending = false;
    return due;
  };
  const finish = (final) => {
    cancel();
    const follow = nearEnd();
    showText(message, "bot", final);
    if (follow) scrollToEnd(true);
    return final;
  };

  if (!(response.headers.get("Content-Type") || "").includes("text/event-stream")) {
    // A server that answered without streaming: one chat.completion object.
    const completion = await response.json();
    text = String(completion?.choices?.[0]?.message?.content ?? "");
    return finish(text);
  }

  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let unread = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      unread += value;
      let newline;
      while ((newline = unread.indexOf("\n")) >= 0) {
        const line = unread.slice(0, newline).replace(/\r$/, "");
        unread = unread.slice(newline + 1);
        if (line.startsWith(":")) continue; // a keep-alive comment
        if (line.startsWith("data:")) { data.push(line.slice(5).replace(/^ /, "")); continue; }
        if (line !== "" || !data.length) continue; // other fields are not used; a blank line ends an event
        const event = data.join("\n");
        data = [];
        if (event.trim() === "[DONE]") return finish(text);
        const chunk = JSON.parse(event);
        if (!chunk || typeof chunk !== "object" || Array.isArray(chunk)) throw new SyntaxError("not a chunk");
        if (chunk.error) {
          const error = new ApiError(String(chunk.error.message || "The reply failed."));
          error.beforeReply = !text; // nothing shown yet: the message is given back, as when it is refused
          throw error;
        }
        if (chunk.chatforge && typeof chunk.chatforge.replace === "string") {
          text = chunk.chatforge.replace; // a plugin changed the reply after it streamed
        } else {
          const delta = chunk.choices?.[0]?.delta;
          if (delta && typeof delta.content === "string") text += delta.content;
        }
        schedule();
      }
    }
  } catch (error) {
    if (cancel()) draw();
    if (error instanceof SyntaxError) throw new ApiError("The server sent a reply this page cannot read.");
    if (error instanceof ApiError || signal.aborted) throw error;
    throw new ApiError("The connection was lost before the reply was complete.");
  } finally {
    reader.cancel().catch(() => {});
  }
  if (cancel()) draw();
  throw new ApiError("The connection closed before the reply was complete.");
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// ------------------------------------------------------------------ commands

function showCommands(filter) {
  const items = commands.filter((command) => !filter || signatureOf(command).startsWith(filter));
  ui.commands.replaceChildren(...items.map((command) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    const signature = document.createElement("span");
    signature.className = "signature";
    signature.textContent = signatureOf(command);
    const help = document.createElement("span");
    help.className = "help";
    help.textContent = command.help || "";
    button.append(signature, help);
    button.addEventListener("click", () => useCommand(command));
    item.appendChild(button);
    return item;
  }));
  ui.commands.hidden = items.length === 0;
  ui.commandsButton.setAttribute("aria-expanded", String(!ui.commands.hidden));
}

function closeCommands() {
  ui.commands.hidden = true;
  commandsOpenedByTyping = false;
  ui.commandsButton.setAttribute("aria-expanded", "false");
}

const signatureOf = (command) => String(command.signature || commandPrefix + command.name);

function useCommand(command) {
  const signature = signatureOf(command);
  ui.input.value = signature;
  resizeInput();
  closeCommands();
  ui.input.focus();
  // Select the arguments' placeholder (as in "/roll <dice>") so typing replaces it.
  const start = commandPrefix.length + String(command.name).length + 1;
  if (command.usage && start < signature.length) ui.input.setSelectionRange(start, signature.length);
  else ui.input.setSelectionRange(signature.length, signature.length);
}

// ------------------------------------------------------------------ input

const growsByItself = CSS.supports("field-sizing", "content");
function resizeInput() {
  if (growsByItself) return;
  ui.input.style.height = "auto"; // CSSOM, which the CSP allows (a style="" attribute it would not)
  ui.input.style.height = `${ui.input.scrollHeight + 2}px`;
}

// A touch screen's keyboard has no Shift+Enter: there Enter is a new line and the Send button sends.
const touchKeyboard = window.matchMedia("(pointer: coarse)").matches;

ui.input.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (Chinese, Japanese) is not a send.
  if (event.key === "Enter" && !event.shiftKey && !touchKeyboard && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    send(ui.input.value);
  } else if (event.key === "Escape" && !ui.commands.hidden) {
    closeCommands();
  }
});

ui.input.addEventListener("input", () => {
  resizeInput();
  // "/" autocomplete: while the text is a command name being typed, list the matching commands.
  const value = ui.input.value;
  if (commands.length && commandPrefix && value.startsWith(commandPrefix) && !/\s/.test(value)) {
    commandsOpenedByTyping = true;
    showCommands(value);
  } else if (commandsOpenedByTyping) {
    closeCommands();
  }
});

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  // Clicking Send moved the focus to it (and disabling it drops the focus): back to the input, to type the
  // next message. Not on a touch screen, where that would bring the keyboard up over the reply.
  if (!touchKeyboard) ui.input.focus();
  send(ui.input.value);
});

ui.forgetKey.addEventListener("click", () => {
  setKey(null); // the next request that needs one asks for it
  ui.input.focus();
});

ui.newChat.addEventListener("click", startNewChat);

ui.commandsButton.addEventListener("click", () => {
  if (ui.commands.hidden) { commandsOpenedByTyping = false; showCommands(""); }
  else closeCommands();
});

// ------------------------------------------------------------------ start

ui.forgetKey.hidden = !apiKey;
restoreTranscript();
ui.input.focus();
Promise.all([loadModel(), loadCommands()]).catch((error) => showError(error.message || String(error)));
