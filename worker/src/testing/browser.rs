//! Headless Chromium over the DevTools protocol, for the dashboard's browser test and its
//! benchmark: Debian's `chromium` (installed by `scripts/setup-system.sh`), started with
//! `--remote-debugging-port=0`, one page attached in flat mode (more on demand), commands
//! answered by id.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Chromium: `$LONGHAUL_CHROMIUM`, else `chromium` or `chromium-browser` on PATH. Missing, the
/// test fails saying how to install it (it is never skipped).
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("LONGHAUL_CHROMIUM") {
        return p.into();
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("no chromium on PATH: run scripts/setup-system.sh (Debian's `chromium` package)");
}

/// A headless Chromium and one page of it, over the DevTools protocol.
pub struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless with a fresh profile and attaches to a blank page.
    pub async fn launch() -> Self {
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--window-size=1400,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromium().display()));
        // "DevTools listening on ws://127.0.0.1:<port>/devtools/browser/<id>"
        let stderr = child.stderr.take().expect("chromium's stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).expect("chromium's DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connecting to chromium's DevTools");
        let mut b = Self { child, ws, session: String::new(), next: 0, _profile: profile };
        b.session = b.open("about:blank").await;
        b
    }

    /// Sends one command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call_on(&session, method, params).await
    }

    /// Sends one command to the page of `session` (from [`Browser::open`]; `""`: the browser
    /// itself) and returns its result.
    pub async fn call_on(&mut self, session: &str, method: &str, params: Value) -> Value {
        self.try_call_on(session, method, params).await.unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// [`Browser::call_on`], or the error Chromium answered (an evaluation whose page navigated
    /// away meanwhile, say).
    pub async fn try_call_on(
        &mut self,
        session: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !session.is_empty() {
            msg["sessionId"] = json!(session);
        }
        self.ws.send(Message::text(msg.to_string())).await.expect("sending to chromium");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer from chromium"))
                .expect("chromium closed the DevTools connection")
                .expect("reading from chromium");
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).expect("chromium sends JSON");
            if v["id"] == json!(id) {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// Opens another page of the same browser at `url` and attaches to it: its session, for
    /// [`Browser::call_on`].
    pub async fn open(&mut self, url: &str) -> String {
        self.open_in(json!({ "url": url })).await
    }

    /// [`Browser::open`] in a browser context of its own: cookies, cache and connections apart,
    /// as in another person's browser (Chromium opens at most 6 HTTP/1.1 connections to a host
    /// per context, and each of the dashboard's event streams holds one).
    pub async fn open_apart(&mut self, url: &str) -> String {
        let context = self.call_on("", "Target.createBrowserContext", json!({})).await;
        let context = context["browserContextId"].clone();
        self.open_in(json!({ "url": url, "browserContextId": context })).await
    }

    async fn open_in(&mut self, params: Value) -> String {
        let target = self.call_on("", "Target.createTarget", params).await;
        let target = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = self
            .call_on("", "Target.attachToTarget", json!({ "targetId": target, "flatten": true }))
            .await;
        attached["sessionId"].as_str().expect("a session id").to_owned()
    }

    /// The browser process's id (its renderers are its descendants).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Evaluates `expr` in the page; its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true }))
            .await;
        r["result"]["value"].clone()
    }

    /// Saves a PNG of the page.
    pub async fn screenshot(&mut self, to: &Path) {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("a screenshot"))
            .expect("a base64 screenshot");
        std::fs::write(to, png).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").field("session", &self.session).finish_non_exhaustive()
    }
}
