//! `moto_server` with what the EC2 tests need in it: a VPC 127.0.0.0/16 with three subnets
//! 127.0.0-2.0/24 (so every instance address is on loopback), an image, and the project's fault
//! proxy in front of it. Explicit credentials, region and endpoint: the SDK never looks for a
//! metadata service.

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use testkit::moto::{FaultProxy, Moto};

pub struct MotoVpc {
    pub moto: Moto,
    /// Point the dispatcher's EC2 driver here (`DriverParameters.Endpoint`).
    pub proxy: FaultProxy,
    /// A client of moto itself (not through the proxy): the harness's view of the cloud.
    pub ec2: aws_sdk_ec2::Client,
    /// The first of [`MotoVpc::subnets`]: where a set of one subnet creates.
    pub subnet: String,
    /// Three subnets (127.0.0.0/24, 127.0.1.0/24, 127.0.2.0/24), as zones.
    pub subnets: Vec<String>,
    pub image: String,
}

/// Start one; `None` (the test is skipped) when moto is not installed, except in CI.
pub async fn moto_vpc() -> Option<MotoVpc> {
    let Some(moto) = Moto::start().await else {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto_server missing in CI: scripts/test installs it"
        );
        eprintln!("SKIPPED: moto_server is not installed (scripts/test installs it into .venv)");
        return None;
    };
    let ec2 = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(&moto.url)
            .build(),
    );
    let vpc = ec2
        .create_vpc()
        .cidr_block("127.0.0.0/16")
        .send()
        .await
        .unwrap();
    let mut subnets = Vec::new();
    for cidr in ["127.0.0.0/24", "127.0.1.0/24", "127.0.2.0/24"] {
        let s = ec2
            .create_subnet()
            .vpc_id(vpc.vpc().unwrap().vpc_id().unwrap())
            .cidr_block(cidr)
            .send()
            .await
            .unwrap();
        subnets.push(s.subnet().unwrap().subnet_id().unwrap().to_string());
    }
    let image = ec2.describe_images().send().await.unwrap().images()[0]
        .image_id()
        .unwrap()
        .to_string();
    let proxy = FaultProxy::start(&moto.url).await;
    Some(MotoVpc {
        moto,
        proxy,
        ec2,
        subnet: subnets[0].clone(),
        subnets,
        image,
    })
}
