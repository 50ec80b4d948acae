//! Test certificates made with rcgen: a CA, a server certificate for
//! `localhost` and 127.0.0.1 signed by it, a client certificate signed by it,
//! and an unrelated CA that a client must not trust. Written as PEM files so
//! the real binaries read them like production files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// PEM files of one test PKI, in a directory the test owns.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate that signed the server and client certificates.
    pub ca: PathBuf,
    /// The server certificate (SANs `localhost` and `127.0.0.1`).
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate (for mTLS) signed by the same CA.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting only it must fail.
    pub other_ca: PathBuf,
    /// A client certificate signed by `other_ca` (refused by the server).
    pub stranger_cert: PathBuf,
    /// The private key of `stranger_cert`.
    pub stranger_key: PathBuf,
}

fn ca(name: &str) -> anyhow::Result<(CertificateParams, KeyPair, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let pem = params.self_signed(&key)?.pem();
    Ok((params, key, pem))
}

fn leaf(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, &KeyPair>,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl TestPki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<TestPki> {
        std::fs::create_dir_all(dir)?;
        let (ca_params, ca_key, ca_pem) = ca("adce test CA")?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let (server_pem, server_key) =
            leaf("adce server", ExtendedKeyUsagePurpose::ServerAuth, &issuer)?;
        let (client_pem, client_key) =
            leaf("adce agent", ExtendedKeyUsagePurpose::ClientAuth, &issuer)?;
        let (other_params, other_key, other_pem) = ca("unrelated CA")?;
        let other_issuer = Issuer::from_params(&other_params, &other_key);
        let (stranger_pem, stranger_key) = leaf(
            "stranger",
            ExtendedKeyUsagePurpose::ClientAuth,
            &other_issuer,
        )?;
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
            stranger_cert: dir.join("stranger.pem"),
            stranger_key: dir.join("stranger.key"),
        };
        for (path, pem) in [
            (&pki.ca, &ca_pem),
            (&pki.server_cert, &server_pem),
            (&pki.server_key, &server_key),
            (&pki.client_cert, &client_pem),
            (&pki.client_key, &client_key),
            (&pki.other_ca, &other_pem),
            (&pki.stranger_cert, &stranger_pem),
            (&pki.stranger_key, &stranger_key),
        ] {
            std::fs::write(path, pem)?;
        }
        Ok(pki)
    }
}
