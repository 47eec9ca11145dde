//! The small HTML pages a browser sees at the end of a connect flow.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::proxy::body::{ProxyBody, full};

/// A page with a title and one paragraph; every piece of text is escaped.
pub fn page(status: StatusCode, title: &str, text: &str) -> Response<ProxyBody> {
    html(status, title, text, "")
}

/// A page whose one button posts `fields` to `action` (same origin): the step a person takes on
/// purpose, which a link opened by a mail scanner or an attacker's redirect does not.
pub fn form_page(title: &str, text: &str, action: &str, fields: &[(&str, &str)], button: &str) -> Response<ProxyBody> {
    let inputs: String = fields
        .iter()
        .map(|(name, value)| format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(name), escape(value)))
        .collect();
    let form = format!(
        "<form method=\"post\" action=\"{}\">{inputs}<button type=\"submit\">{}</button></form>",
        escape(action),
        escape(button)
    );
    let mut response = html(StatusCode::OK, title, text, &form);
    // The form's own origin may see the page as its referrer, so the browser sends the page's Origin
    // with the post (under no-referrer it sends "null", like any sandboxed or privacy-minded site).
    response.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

fn html(status: StatusCode, title: &str, text: &str, form: &str) -> Response<ProxyBody> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <meta name=\"viewport\" content=\"width=device-width\"></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\"><h1>{t}</h1><p>{p}</p>{form}</body></html>",
        t = escape(title),
        p = escape(text)
    );
    let mut response = Response::new(full(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No script, style only inline, never framed (a framed consent flow is a clickjacking aid).
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // The link and the code are in this page's URL: no other site may see it as a referrer.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_escaped() {
        assert_eq!(super::escape("<b>\"x\" & 'y'</b>"), "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;");
    }
}
