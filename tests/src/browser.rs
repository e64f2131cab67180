//! A signed-in browser over plain HTTP (no script): cookies kept by hand, forms posted with
//! their CSRF tokens, redirects not followed, so tests see every step.

use std::collections::HashMap;

/// Where a redirect points.
pub fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The value of a page's hidden `csrf` field.
pub fn hidden_csrf(body: &str) -> Option<String> {
    let at = body.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(body[at..].split('"').next()?.to_owned())
}

/// A browser without a cookie jar crate: keeps the cookies it is sent, follows nothing.
pub struct Browser {
    http: reqwest::Client,
    /// The node it talks to (change it to talk to another).
    pub base: String,
    cookies: HashMap<String, String>,
}

impl Browser {
    /// A browser with no cookies, talking to `base`.
    pub fn new(base: &str) -> anyhow::Result<Browser> {
        Ok(Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            base: base.to_owned(),
            cookies: HashMap::new(),
        })
    }

    fn keep(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all("set-cookie") {
            let Ok(v) = v.to_str() else { continue };
            let pair = v.split(';').next().unwrap_or_default();
            if let Some((k, val)) = pair.split_once('=') {
                if val.is_empty() || v.contains("Max-Age=0") {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_owned(), val.to_owned());
                }
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// GET `path`: (status, Location, body).
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, String, String)> {
        let r = self
            .http
            .get(self.url(path))
            .header("cookie", self.cookie_header())
            .send()
            .await?;
        self.keep(&r);
        let location = location(&r);
        Ok((r.status().as_u16(), location, r.text().await?))
    }

    /// POST a form to `path`: (status, Location).
    pub async fn post(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
    ) -> anyhow::Result<(u16, String)> {
        let r = self
            .http
            .post(self.url(path))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await?;
        self.keep(&r);
        Ok((r.status().as_u16(), location(&r)))
    }

    /// The flash message the next page shows.
    pub async fn flash(&mut self, path: &str) -> anyhow::Result<String> {
        let (_, _, body) = self.get(path).await?;
        Ok(body
            .split("class=\"flash")
            .nth(1)
            .and_then(|s| s.split('>').nth(1))
            .and_then(|s| s.split('<').next())
            .unwrap_or_default()
            .to_owned())
    }

    /// The CSRF token in the page at `path`.
    pub async fn csrf(&mut self, path: &str) -> anyhow::Result<String> {
        let (_, _, body) = self.get(path).await?;
        hidden_csrf(&body).ok_or_else(|| anyhow::anyhow!("no csrf field in {path}: {body}"))
    }

    /// Signs in with the password every test account uses; answers where it was sent.
    pub async fn sign_in(&mut self, email: &str) -> anyhow::Result<String> {
        let csrf = self.csrf("/portal/signin").await?;
        let (_, loc) = self
            .post(
                "/portal/signin",
                &[
                    ("csrf", &csrf),
                    ("email", email),
                    ("password", "a long enough password"),
                ],
            )
            .await?;
        Ok(loc)
    }

    /// Signs up with the password every test account uses.
    pub async fn sign_up(&mut self, email: &str) -> anyhow::Result<()> {
        let csrf = self.csrf("/portal/signup").await?;
        let (status, loc) = self
            .post(
                "/portal/signup",
                &[
                    ("csrf", &csrf),
                    ("email", email),
                    ("password", "a long enough password"),
                ],
            )
            .await?;
        anyhow::ensure!((status, loc.as_str()) == (303, "/portal"), "{status} {loc}");
        Ok(())
    }
}
