//! Headless Chromium for the dashboard tests: load a page, let its scripts
//! run for a while in real time, then read the DOM or take a screenshot.
//!
//! Chromium's one-shot flags do not fit a page that keeps an EventSource
//! open: `--dump-dom` and `--screenshot` fire at the load event, before the
//! stream has delivered anything, and `--virtual-time-budget` never expires
//! because virtual time stands still while a fetch (the SSE stream) is
//! pending, so chromium hangs. Instead we drive it over the DevTools protocol
//! on `--remote-debugging-pipe` (NUL-terminated JSON on fds 3 and 4, no
//! websocket needed): open the page, sleep for `wait`, then evaluate
//! `outerHTML` or call `Page.captureScreenshot`.
//!
//! Chromium runs in its own process group with a throwaway profile; the group
//! is killed when we are done, when it overruns `wait` + 30 s, and (through
//! PR_SET_PDEATHSIG on the browser process) when the test process dies.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long chromium may take beyond the requested wait before it is killed.
const GRACE: Duration = Duration::from_secs(30);
/// How long a starting chromium may take to answer its first command.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Debian's chromium: `BATON_CHROMIUM`, else `chromium` / `chromium-browser`
/// on PATH. None if absent.
pub fn chromium() -> Option<PathBuf> {
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(path) = std::env::var_os("BATON_CHROMIUM").map(PathBuf::from)
        && executable(&path)
    {
        return Some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| executable(candidate))
}

/// Loads `url` in headless chromium, lets its scripts run for `wait` (real
/// time), and returns the serialized DOM, as `--dump-dom` would print it.
pub fn dump_dom(chromium: &Path, url: &str, wait: Duration) -> String {
    let mut page = Page::open(chromium, url, wait, (1280, 800));
    let answer = page.call(
        "Runtime.evaluate",
        json!({"expression": "document.documentElement.outerHTML", "returnByValue": true}),
    );
    match answer["result"]["value"].as_str() {
        Some(html) => html.to_owned(),
        None => page.fail(&format!("could not serialize the DOM: {answer}")),
    }
}

/// Same, saving a PNG screenshot of the `size` (width, height) viewport to `path`.
pub fn screenshot(chromium: &Path, url: &str, wait: Duration, size: (u32, u32), path: &Path) {
    let mut page = Page::open(chromium, url, wait, size);
    let answer = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let Some(data) = answer["data"].as_str() else {
        page.fail(&format!("no screenshot: {answer}"))
    };
    let png = base64_decode(data);
    std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// One chromium process showing one page, killed (with its helpers) on drop.
struct Page {
    child: Child,
    commands: std::io::PipeWriter,
    responses: Receiver<Value>,
    session: Option<String>,
    next_id: u64,
    deadline: Instant,
    stderr: PathBuf,
    // Dropped after `child` is killed (field order), so chromium is gone
    // before its profile is deleted.
    _profile: tempfile::TempDir,
}

impl Page {
    /// Starts chromium, opens `url` in a `size` viewport and waits `wait`.
    /// A chromium that does not answer its first command in [`START_TIMEOUT`]
    /// (a start starved of CPU on a loaded machine) is killed and started
    /// once more; a second silence fails the test.
    fn open(chromium: &Path, url: &str, wait: Duration, size: (u32, u32)) -> Page {
        let mut attempt = 1;
        let (mut page, target) = loop {
            let mut page = Page::launch(chromium, size, Instant::now() + START_TIMEOUT);
            match page.try_call("Target.createTarget", json!({"url": "about:blank"})) {
                Ok(target) => break (page, target),
                Err(why) if attempt == 1 => {
                    eprintln!("headless chromium: {why}; starting it once more");
                    page.kill();
                    attempt += 1;
                }
                Err(why) => page.fail(&why),
            }
        };
        page.deadline = Instant::now() + wait + GRACE;
        let target = target["targetId"].clone();
        let attached = page.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        page.session = attached["sessionId"].as_str().map(str::to_owned);
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": size.0, "height": size.1, "deviceScaleFactor": 1, "mobile": false}),
        );
        let navigated = page.call("Page.navigate", json!({"url": url}));
        if let Some(error) = navigated["errorText"].as_str() {
            page.fail(&format!("could not load {url}: {error}"));
        }
        std::thread::sleep(wait);
        page
    }

    /// Starts chromium on a fresh profile, talking DevTools over two pipes.
    fn launch(chromium: &Path, size: (u32, u32), deadline: Instant) -> Page {
        let profile = tempfile::tempdir().expect("a temporary chromium profile");
        let stderr = profile.path().join("chromium.stderr");
        // Chromium reads commands from fd 3 and writes answers to fd 4.
        let (command_reader, command_writer) = std::io::pipe().expect("a pipe");
        let (answer_reader, answer_writer) = std::io::pipe().expect("a pipe");
        let (child_in, child_out) = (command_reader.as_raw_fd(), answer_writer.as_raw_fd());

        let mut command = Command::new(chromium);
        command
            .args([
                "--headless",
                "--no-sandbox", // tests run as root
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--window-size={},{}", size.0, size.1))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("chromium's stderr log"))
            // Its own group, so one kill takes the renderer and GPU helpers too.
            .process_group(0);
        super::die_with_parent(&mut command);
        unsafe {
            command.pre_exec(move || {
                // Through fds >= 10 first: a plain dup2 could clobber the other
                // pipe if it happens to sit on fd 3 or 4 already.
                let input = libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10);
                let output = libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10);
                if input < 0 || output < 0 || libc::dup2(input, 3) < 0 || libc::dup2(output, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display()));
        // Only chromium may hold these ends, so its exit reads as EOF here.
        drop((command_reader, answer_writer));

        let (sender, responses) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(answer_reader);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop_if(|b| *b == 0);
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && sender.send(value).is_err()
                {
                    break;
                }
                message.clear();
            }
        });

        Page {
            child,
            commands: command_writer,
            responses,
            session: None,
            next_id: 0,
            deadline,
            stderr,
            _profile: profile,
        }
    }

    /// Sends one DevTools command (to the page once attached) and returns its
    /// result; panics on an error answer, a dead browser or the deadline.
    fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params) {
            Ok(result) => result,
            Err(why) => self.fail(&why),
        }
    }

    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        if let Err(e) = self.commands.write_all(&bytes) {
            return Err(format!("sending {method}: {e}"));
        }
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                // Events (no id) and answers to other commands are not ours.
                Ok(answer) if answer["id"].as_u64() != Some(id) => continue,
                Ok(answer) if answer.get("error").is_some() => {
                    return Err(format!("{method} failed: {}", answer["error"]));
                }
                Ok(mut answer) => return Ok(answer["result"].take()),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no answer to {method} in time; killed"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("chromium exited during {method}"));
                }
            }
        }
    }

    /// Kills chromium and panics with `what` and the end of its stderr.
    fn fail(&mut self, what: &str) -> ! {
        self.kill();
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        // D-Bus complaints are routine in a container; they would hide the cause.
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(":ERROR:dbus/"))
            .rev()
            .take(20)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "headless chromium: {what}\n--- chromium stderr (tail) ---\n{}",
            tail.join("\n")
        );
    }

    fn kill(&mut self) {
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Standard base64 (DevTools sends screenshots so); no dependency for one use.
fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut count) = (0u32, 0u32);
    for byte in text.bytes().filter(|b| *b != b'=') {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            other => panic!("not base64: byte {other}"),
        };
        bits = ((bits << 6) | u32::from(value)) & 0xffff;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}
