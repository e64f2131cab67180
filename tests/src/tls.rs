//! Test certificates made with `openssl`: a CA and a leaf for localhost / 127.0.0.1 signed by
//! it (webpki refuses a CA certificate as a leaf).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Certificate files in a directory.
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The leaf certificate (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM).
    pub key: PathBuf,
}

fn openssl(args: &[&OsStr]) -> anyhow::Result<()> {
    let status = std::process::Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl failed");
    Ok(())
}

/// Makes a CA and a leaf for `localhost` and `127.0.0.1` in `dir`.
pub fn make(dir: &Path) -> anyhow::Result<Certs> {
    let p = |n: &str| dir.join(n);
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("cert.pem"),
        p("key.pem"),
        p("leaf.csr"),
        p("leaf.ext"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    let s = OsStr::new;
    let ec = [
        s("-newkey"),
        s("ec"),
        s("-pkeyopt"),
        s("ec_paramgen_curve:prime256v1"),
        s("-nodes"),
    ];
    let mut ca_args = vec![s("req"), s("-x509")];
    ca_args.extend(ec);
    ca_args.extend([s("-days"), s("1"), s("-subj"), s("/CN=custos test CA")]);
    ca_args.extend([s("-keyout"), ca_key.as_os_str(), s("-out"), ca.as_os_str()]);
    openssl(&ca_args)?;
    let mut leaf_args = vec![s("req")];
    leaf_args.extend(ec);
    leaf_args.extend([s("-subj"), s("/CN=localhost")]);
    leaf_args.extend([s("-keyout"), key.as_os_str(), s("-out"), csr.as_os_str()]);
    openssl(&leaf_args)?;
    openssl(&[
        s("x509"),
        s("-req"),
        s("-in"),
        csr.as_os_str(),
        s("-CA"),
        ca.as_os_str(),
        s("-CAkey"),
        ca_key.as_os_str(),
        s("-CAcreateserial"),
        s("-days"),
        s("1"),
        s("-extfile"),
        ext.as_os_str(),
        s("-out"),
        cert.as_os_str(),
    ])?;
    Ok(Certs { ca, cert, key })
}
