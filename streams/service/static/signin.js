// The one place that knows how the pages are authorised (/ and /experiment
// both load it). With LIFTSTREAM_API_TOKEN set, the API answers 401 until the
// page signs in: the form (#login, #token, #status) posts the token to /login,
// which sets an HttpOnly, SameSite=Strict session cookie the page's requests
// then carry. The token is never in a URL and never stored where scripts can
// read it.
"use strict";

class Unauthorized extends Error {}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (r.status === 401) throw new Unauthorized(path);
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

function askToken(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("status").textContent = message;
  document.getElementById("token").focus();
}

// Wire the sign-in form: after a good token, ``onSignedIn()`` (the page's refresh).
function signInWith(onSignedIn) {
  const form = document.getElementById("login");
  const field = document.getElementById("token");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = field.value;
    field.value = "";
    const r = await fetch("/login", { method: "POST", credentials: "same-origin", cache: "no-store",
                                      headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify({ token }) });
    if (!r.ok) { askToken(r.status === 401 ? "wrong token" : `sign-in failed: ${r.status}`); return; }
    form.hidden = true;
    onSignedIn();
  });
}
